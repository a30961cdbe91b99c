"""`nvdiag demo` (not yet implemented)."""
