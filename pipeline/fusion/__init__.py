"""Adapter fusion parts: LoRA tensors shared by every fusion method, the learned per-token gate
(AdapterFusion on LoRA) and its training."""
