"""The stage recipes the CLI runs: sft, reward, ppo, fuse, evaluate (and score). Each reads top to bottom
in numbered steps and uses the parts below it; no stage imports another."""
