"""Block drivers: what a node reads from and writes to."""
