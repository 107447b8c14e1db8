"""The training run: `python -m training.train` (loop.py) and what only the loop uses: pre-start validation, lr
schedule, metrics, TensorBoard, FLOPs."""
