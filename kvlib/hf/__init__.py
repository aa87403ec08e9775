"""Checkpoints in the Hugging Face layout, per model family: ``gpt2.py``, ``llama.py`` (Llama 3 and
Qwen3), ``deepseek.py`` (DeepSeek-V3, dense layers); shared file handling in ``files.py``.
Imported lazily by ``kvlib.load_model``."""
