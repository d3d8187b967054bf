"""The benchmark suite and scripts (not part of the gradstats package; see README.md here)."""
