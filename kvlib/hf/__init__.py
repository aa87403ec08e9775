"""Checkpoints in the Hugging Face layout, per model family: ``gpt2.py``; shared file handling in
``files.py``. Imported lazily by ``kvlib.load_model(..., pretrained=True)``."""
