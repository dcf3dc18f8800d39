"""Models and adapters: names to folders, loading and NF4 quantisation, one base with many adapters,
the lean LoRA kernels, the reward model as a scorer, and the glue to transformers' Trainer."""
