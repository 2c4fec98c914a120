"""Serving an engine: one request queue (`scheduler.py`) behind an HTTP app (`app.py`, `engine-serve`)."""
