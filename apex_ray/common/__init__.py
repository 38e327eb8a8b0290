"""Small helpers every layer may use (no project imports): seeds, pixel conversions, atomic files."""
