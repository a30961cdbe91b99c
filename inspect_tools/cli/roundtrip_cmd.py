"""`nvdiag roundtrip` (not yet implemented)."""
