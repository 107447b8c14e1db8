"""Export: `python -m training.export` (model_dir.py): a checkpoint -> a model directory (Base, CustomVoice, LoRA
merged or adapter)."""
