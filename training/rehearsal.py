"""`python -m training.rehearsal`: only the command.

The code is training.data.rehearsal (training/data/rehearsal.py)."""
from training.data.rehearsal import main

if __name__ == "__main__":
    main()
