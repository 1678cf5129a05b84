"""Small helpers with no maxdrop imports of their own: every other package may import them."""
