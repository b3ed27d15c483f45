"""Data schemas, readers of real formats, tokenisation, collation."""
