"""The one model loader: a preset with seeded random weights, or real weights from a checkpoint.

    kvlib.load_model("gpt2")                    # GPT-2 124M shape, seeded random weights
    kvlib.load_model("gpt2", pretrained=True)   # OpenAI's weights (hub, or HF_HUB_OFFLINE cache)
    kvlib.load_model("/path/to/checkpoint")     # a local Hugging Face folder or .safetensors file
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models import PRESETS, CausalLM, build_model


def load_model(preset_or_path: str | os.PathLike = "gpt2", pretrained: bool = False,
               seed: int = 123, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> CausalLM:
    """The model a chapter, test or benchmark uses, in eval mode, on ``device`` in ``dtype``.

    A preset name (see ``kvlib.PRESETS``) with ``pretrained=False`` (the default, used by CI and
    the built book) gives seeded random weights, so every number is reproducible offline;
    ``pretrained=True`` loads the released weights of that name (needs internet once, and the
    ``pretrained`` extra). A local path always loads the weights it holds.
    """
    name = os.fspath(preset_or_path)
    is_path = name not in PRESETS and (Path(name).expanduser().exists() or os.sep in name)
    if pretrained or is_path:
        model = _load_weights(name)
    elif name in PRESETS:
        torch.manual_seed(seed)
        model = build_model(PRESETS[name])
    else:
        raise ValueError(f"unknown model {name!r}: pass a preset ({', '.join(PRESETS)}) "
                         "or the path of a local checkpoint")
    return model.to(device=device, dtype=dtype).eval()


def _load_weights(name: str) -> CausalLM:
    from .hf import gpt2

    return gpt2.from_pretrained(name)
