"""The one model loader: a preset with seeded random weights, the models trained here, or real
weights from a checkpoint.

    kvlib.load_model("gpt2")                    # GPT-2 124M shape, seeded random weights
    kvlib.load_model("mini-gpt2")               # trained here, shipped with kvlib (kvlib/trained/)
    kvlib.load_model("gpt2", pretrained=True)   # OpenAI's weights (hub, or HF_HUB_OFFLINE cache)
    kvlib.load_model("qwen3-0.6b", pretrained=True)  # Qwen/Qwen3-0.6B from the hub
    kvlib.load_model("/path/to/checkpoint")     # a local Hugging Face folder or .safetensors file
    kvlib.load_model(GPTConfig(n_layers=2, ...))  # a shape no preset names, seeded random weights

A local checkpoint's family comes from its ``config.json`` (``model_type``: ``gpt2``, ``llama``,
``qwen3``, ``deepseek_v3``, ``gemma3_text`` or ``gpt_oss``); a GPT-2 file without one is read
off its tensor shapes. A folder that also holds a kvlib ``vocab.json`` (a trimmed vocabulary,
``kvlib.vocab``) gives a model that carries it as ``model.tokenizer``:
``kvlib.tokenizer_for(model)`` returns it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models import (
    PRESETS,
    CausalLM,
    DeepseekModel,
    GemmaModel,
    GPTModel,
    GptOssModel,
    ModelConfig,
    build_model,
)
from .vocab import TrimmedTokenizer, is_vocab_file

TRAINED_DIR = Path(__file__).resolve().parent / "trained"  # kvlib/trained/<name>/
TRAINED = ("mini-gpt2", "mini-llama", "mini-llama-draft")  # the presets whose weights ship
VOCAB_FILE = "vocab.json"


def load_model(preset_or_path: str | os.PathLike | ModelConfig = "gpt2",
               pretrained: bool | None = None, seed: int = 123, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> CausalLM:
    """The model a chapter, test or benchmark uses, in eval mode, on ``device`` in ``dtype``.

    A preset name (see ``kvlib.PRESETS``) gives seeded random weights (``pretrained`` unset or
    False: what CI and the built book use, reproducible offline), or with ``pretrained=True`` the
    released weights of that name (needs internet once, and the ``pretrained`` extra). The models
    trained here (``"mini-gpt2"``, ``"mini-llama"``) load their shipped weights unless
    ``pretrained=False`` asks for random ones; either way they carry their tokenizer. A local
    path always loads the weights it holds. A config (``GPTConfig``, ``LlamaConfig``,
    ``DeepseekConfig``) gives seeded random weights of a shape no preset names
    (``kvlib.check_cache``'s small model).
    """
    if isinstance(preset_or_path, ModelConfig):
        torch.manual_seed(seed)
        return _ready(build_model(preset_or_path), dtype, device)
    name = os.fspath(preset_or_path)
    is_path = name not in PRESETS and (Path(name).expanduser().exists() or os.sep in name)
    if name in TRAINED and pretrained is not False:
        model = load_trained(name)
    elif pretrained or is_path:
        model = _load_weights(name)
    elif name in PRESETS:
        torch.manual_seed(seed)
        model = build_model(PRESETS[name])
        if name in TRAINED and (TRAINED_DIR / name / VOCAB_FILE).is_file():
            model.tokenizer = TrimmedTokenizer.load(TRAINED_DIR / name / VOCAB_FILE)
    else:
        raise ValueError(f"unknown model {name!r}: pass a preset ({', '.join(PRESETS)}) "
                         "or the path of a local checkpoint")
    return _ready(model, dtype, device)


def _ready(model: CausalLM, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    """The model on ``device`` in ``dtype``, its weights laid out for them, in eval mode."""
    model = model.to(device=device, dtype=dtype)
    model.arrange_weights()  # the memory layout this dtype and device decode fastest
    return model.eval()


def load_trained(name: str) -> CausalLM:
    """A model trained here, from ``kvlib/trained/<name>/`` (as stored: bfloat16), carrying its
    tokenizer; a clear error when the files are not there."""
    folder = TRAINED_DIR / name
    missing = [f for f in ("model.safetensors", "config.json", VOCAB_FILE)
               if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name!r} has no trained weights yet: {', '.join(missing)} missing from {folder}. "
            f"They ship with kvlib installed from git; to make them yourself, run "
            f"python -m kvlib.train --model {name} (or load random weights of the same shape "
            f"with kvlib.load_model({name!r}, pretrained=False))")
    return _load_weights(str(folder))


def save_model(model: CausalLM, folder: str | os.PathLike,
               dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write ``model`` into ``folder`` as ``load_model(folder)`` reads it: ``model.safetensors``
    in Hugging Face's layout (stored as ``dtype``), ``config.json``, and the tokenizer it
    carries, if any, as ``vocab.json``."""
    from .hf import deepseek, gemma, gpt2, gpt_oss, llama

    family = llama
    if isinstance(model, GPTModel):
        family = gpt2
    elif isinstance(model, DeepseekModel):
        family = deepseek
    elif isinstance(model, GemmaModel):
        family = gemma
    elif isinstance(model, GptOssModel):
        family = gpt_oss
    folder = family.save_pretrained(model, folder, dtype)
    tokenizer = getattr(model, "tokenizer", None)
    if isinstance(tokenizer, TrimmedTokenizer):
        tokenizer.save(folder / VOCAB_FILE)
    return folder


def _load_weights(name: str) -> CausalLM:
    from .hf import deepseek, gemma, gpt2, gpt_oss, llama

    path = Path(name).expanduser()
    if not path.exists():
        for family in (gpt2, llama, gemma):
            if name in family.HUB_NAMES or name in family.HUB_NAMES.values():
                return family.from_pretrained(name)
        hub = [*gpt2.HUB_NAMES, *llama.HUB_NAMES, *gemma.HUB_NAMES]
        if os.sep in name or name.endswith(".safetensors"):
            raise FileNotFoundError(f"{name!r}: no such checkpoint file or directory (pass a "
                                    f"local Hugging Face folder, or a hub name: {', '.join(hub)})")
        raise FileNotFoundError(
            f"{name!r} is neither a model with released weights ({', '.join(hub)}) nor an "
            "existing file or directory; the other presets have no weights to download: "
            "load them with pretrained=False")
    model_type = checkpoint_family(path)
    family = next((f for f in (llama, deepseek, gemma, gpt_oss) if model_type in f.MODEL_TYPES),
                  gpt2)
    model = family.from_pretrained(name)
    vocab = (path if path.is_dir() else path.parent) / VOCAB_FILE
    if is_vocab_file(vocab):  # not Hugging Face's GPT-2 vocab.json, which has another layout
        model.tokenizer = TrimmedTokenizer.load(vocab)
    return model


def checkpoint_family(path: Path) -> str:
    """``model_type`` of a local checkpoint's ``config.json`` ("gpt2" when there is none: GPT-2
    is the one family whose config kvlib can read off the tensor shapes)."""
    config = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not config.is_file():
        return "gpt2"
    try:
        model_type = json.loads(config.read_text()).get("model_type", "gpt2")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config}: not a readable config.json ({e})") from e
    if model_type not in ("gpt2", "llama", "qwen3", "deepseek_v3", "gemma3_text", "gpt_oss"):
        raise ValueError(f"{config}: model_type {model_type!r}; kvlib loads GPT-2, Llama and "
                         "Qwen3 checkpoints, DeepSeek-V3's with dense layers, Gemma 3 text and "
                         "gpt-oss ones (model_type 'gpt2', 'llama', 'qwen3', 'deepseek_v3', "
                         "'gemma3_text' or 'gpt_oss')")
    return model_type
