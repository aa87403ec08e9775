"""Small helpers the chapters share: the model switch, the environment line, showing real source."""

from __future__ import annotations

import inspect
import os
import platform

import torch

from .config import GPTConfig
from .model import GPTModel

REPO_URL = "https://github.com/kv-cache-from-scratch/kv-cache-from-scratch"


def load_model(preset: str = "gpt2", pretrained: bool = False, seed: int = 123,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> GPTModel:
    """The model a chapter uses, in eval mode.

    ``pretrained=False`` (the default, used by CI and the built book) gives seeded random weights,
    so every number is reproducible offline; ``pretrained=True`` downloads OpenAI's GPT-2 weights
    for the same architecture (needs internet and ``safetensors``/``huggingface_hub``).
    """
    if pretrained:
        from .pretrained import from_pretrained

        model = from_pretrained(preset)
    else:
        torch.manual_seed(seed)
        model = GPTModel(GPTConfig.from_preset(preset))
    return model.to(device=device, dtype=dtype).eval()


def environment(model: GPTModel | None = None) -> str:
    """One line naming what a measurement ran on: device, dtype, threads, torch, CPU."""
    p = next(model.parameters()) if model is not None else torch.empty(0)
    device = p.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    return (f"device={device.type} ({name}), dtype={str(p.dtype).removeprefix('torch.')}, "
            f"threads={torch.get_num_threads()}, torch={torch.__version__}, "
            f"cpus={os.cpu_count()}")


def show_source(obj) -> object:
    """The real source of a kvlib function or class, syntax-highlighted in a notebook."""
    src = inspect.getsource(obj)
    try:
        from IPython.display import Markdown

        return Markdown(f"```python\n{src}```")
    except ImportError:  # plain Python: just the text
        return src
