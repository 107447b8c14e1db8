"""`python -m training.train`: only the command.

The code is training.train.loop (training/train/loop.py)."""
from training.train.loop import main

if __name__ == "__main__":
    main()
