"""Small shared helpers: safe checkpoint loading and atomic writes."""
