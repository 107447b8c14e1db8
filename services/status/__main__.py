"""`python -m services.status`: only the command.

The code is services.status.server (services/status/server.py)."""
import sys

from services.status.server import main

if __name__ == "__main__":
    sys.exit(main())
