"""Data: reading rows from files and the hub, conversation formats, token-length fitting, and the
generator of the shipped data/ folder."""
