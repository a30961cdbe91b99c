"""`nvdiag preset` (not yet implemented)."""
