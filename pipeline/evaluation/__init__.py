"""Evaluation parts: small statistics, KL-versus-reward curves (points, Gao fits, table, plot), best-of-n
picking from a pool of scored samples, and the forgetting probe on general text."""
