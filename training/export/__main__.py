"""`python -m training.export`: only the command.

The code is training.export.model_dir (training/export/model_dir.py)."""
from training.export.model_dir import main

if __name__ == "__main__":
    main()
