"""Helpers shared by `train_model.py` and `quantize_model.py` (data split, augmentation)."""
