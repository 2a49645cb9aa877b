"""Checkpoint conversion (Hugging Face export/import) and evaluation entry points: see the conversion issue."""
