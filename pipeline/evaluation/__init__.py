"""Evaluation parts: small statistics, KL-versus-reward curves (points, Gao fits, table, plot) and the
forgetting probe on general text."""
