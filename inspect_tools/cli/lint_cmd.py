"""`nvdiag lint` (not yet implemented)."""
