"""Data access: the product's SQL, behind typed functions."""
