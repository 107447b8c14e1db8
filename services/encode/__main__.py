"""`python -m services.encode`: only the command.

The code is services.encode.driver (services/encode/driver.py)."""
import sys

from services.encode.driver import main

if __name__ == "__main__":
    sys.exit(main())
