"""What stages write and read: atomic outputs and manifests, content hashes, checkpoints and state
files, and the guard (stage locks, signals, disk checks)."""
