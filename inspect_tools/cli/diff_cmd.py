"""`nvdiag diff` (not yet implemented)."""
