"""`nvdiag fix` (not yet implemented)."""
