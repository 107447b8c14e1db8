"""The status server: `python -m services.status` (server.py) and what it serves, computed from an encode output
directory only."""
