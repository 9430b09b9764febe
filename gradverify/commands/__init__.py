"""Commands besides `check`: `list` (what a check would run) and `init` (a starter spec)."""
