"""Pieces every part of crosscheck may import: metrics, the float64 reference, losses, dtypes, report files,
Ctrl-C handling.  Nothing here imports another part."""
