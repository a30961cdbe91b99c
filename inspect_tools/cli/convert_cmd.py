"""`nvdiag convert` (not yet implemented)."""
