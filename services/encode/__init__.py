"""The encode job: `python -m services.encode` (driver.py) and its parts: input, plan, encoder actors, publishing,
one-driver locks, end-of-run files."""
