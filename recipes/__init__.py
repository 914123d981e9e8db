"""Runnable recipes (installed as ``dataflex.recipes``; each file also runs as a script)."""
