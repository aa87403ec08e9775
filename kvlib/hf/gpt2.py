"""OpenAI's GPT-2 weights in kvlib, and back: safetensors only, one name table for both ways.

kvlib's module names follow Hugging Face's ``GPT2LMHeadModel`` (``wte``, ``h.0.attn.c_attn``, ...),
so a kvlib tensor ``h.0.attn.c_attn.weight`` is HF's ``transformer.h.0.attn.c_attn.weight``. Two
differences remain: HF's GPT-2 stores its projections as ``Conv1D`` with weights ``(in, out)``,
the transpose of ``nn.Linear``'s ``(out, in)``; and the output head is tied to the token embedding,
so checkpoints usually omit ``lm_head.weight``.

``safetensors``, ``huggingface_hub`` (and ``transformers`` for :func:`hf_config`) are imported only
when used: ``pip install "kvlib[pretrained]"``. Nothing here unpickles a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..models.gpt2 import GPT2_PRESETS as PRESETS
from ..models.gpt2 import GPTConfig, GPTModel
from .files import download, few, local_files, read_safetensors, write_checkpoint

HUB_NAMES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large",
                                                          "gpt2-xl")}

# The one name table: kvlib name -> (HF name, is a Conv1D weight stored transposed). {i} is a layer.
_TOP = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
          "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
          "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
_CONV1D = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
# Causal-mask buffers that older transformers versions (and OpenAI's files) store: not weights.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def name_table(n_layers: int) -> dict[str, tuple[str, bool]]:
    """``{kvlib name: (HF GPT2LMHeadModel name, transposed)}``: every weight but the tied head."""
    table = {name: (f"transformer.{name}", False) for name in _TOP}
    for i in range(n_layers):
        for name in _BLOCK:
            table[f"h.{i}.{name}"] = (f"transformer.h.{i}.{name}", name in _CONV1D)
    return table


def to_hf_state_dict(model: GPTModel) -> dict[str, Tensor]:
    """The state dict of Hugging Face's ``GPT2LMHeadModel`` holding ``model``'s weights.

    ``GPT2LMHeadModel(hf_config(model.cfg)).load_state_dict(sd, strict=False)`` gives the same
    model. ``lm_head.weight`` is included and is the same tensor as ``transformer.wte.weight``
    (tied; drop it before ``safetensors.torch.save_file``, which refuses shared tensors). Absent:
    the causal-mask buffers ``transformer.h.{i}.attn.bias`` / ``attn.masked_bias`` that older
    transformers versions keep (hence ``strict=False``). Untransposed tensors share memory with
    ``model``; Conv1D weights are transposed copies.
    """
    if not model.cfg.qkv_bias:
        raise ValueError("GPT-2 (and HF's GPT2LMHeadModel) has a QKV bias; this model has none")
    sd = model.state_dict()
    hf = {hf_name: sd[name].t().contiguous() if transposed else sd[name]
          for name, (hf_name, transposed) in name_table(model.cfg.n_layers).items()}
    hf["lm_head.weight"] = hf["transformer.wte.weight"]
    return hf


def from_hf_state_dict(sd: dict[str, Tensor], cfg: GPTConfig, source: str = "state dict"
                       ) -> GPTModel:
    """A kvlib ``GPTModel`` (eval mode) from a GPT-2 state dict in Hugging Face's layout.

    Keys may carry the ``transformer.`` prefix (``GPT2LMHeadModel``) or not (``GPT2Model``, OpenAI's
    files); the causal-mask buffers ``h.{i}.attn.bias``/``attn.masked_bias`` are ignored;
    ``lm_head.weight`` may be absent (it is tied) but if present must equal ``wte.weight``. A
    missing, unexpected or wrongly shaped tensor raises a ``ValueError`` naming it and ``source``.
    Tensors that need no transpose are used as they are (no copy): the model shares their memory.
    """
    table = name_table(cfg.n_layers)
    by_hf = {hf.removeprefix("transformer."): (name, t) for name, (hf, t) in table.items()}
    expected = _expected_shapes(cfg)
    weights: dict[str, Tensor] = {}
    head, unexpected = None, []
    for key, tensor in sd.items():
        short = key.removeprefix("transformer.")
        if _BUFFER.fullmatch(short):
            continue
        if short == "lm_head.weight":
            head = (key, tensor)
            continue
        if short not in by_hf:
            unexpected.append(key)
            continue
        name, transposed = by_hf[short]
        want = expected[name]
        got = tuple(tensor.shape[::-1] if transposed else tensor.shape)
        if got != want:
            hf_want = want[::-1] if transposed else want
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                             f"{hf_want} for {_describe(cfg)}")
        weights[name] = tensor.t().contiguous() if transposed else tensor
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {few(unexpected)}: not part of a GPT-2 "
                         f"with {cfg.n_layers} layers (is this a GPT-2 checkpoint?)")
    missing = [table[name][0].removeprefix("transformer.") for name in table if name not in weights]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {few(missing)} for {_describe(cfg)}")
    if head is not None and not torch.equal(head[1], weights["wte.weight"]):
        raise ValueError(f"{source}: {head[0]!r} differs from wte.weight, but kvlib ties the "
                         "output head to the token embedding, as GPT-2 does")

    with torch.device("meta"):  # no time spent on a random init that is overwritten at once
        model = GPTModel(cfg)
    weights["lm_head.weight"] = weights["wte.weight"]
    model.load_state_dict(weights, assign=True)
    model.arrange_weights()  # the fast layout for decoding; also re-ties the head
    return model.eval()


# kvlib GPTConfig field -> HF GPT2Config field (config.json); both directions use it.
_CONFIG_FIELDS = {"vocab_size": "vocab_size", "context_length": "n_positions", "emb_dim": "n_embd",
                  "n_heads": "n_head", "n_layers": "n_layer"}


def hf_config(cfg: GPTConfig):
    """The ``transformers.GPT2Config`` of a kvlib ``GPTConfig`` (transformers imported lazily)."""
    from transformers import GPT2Config

    end = min(50256, cfg.vocab_size - 1)  # GPT-2's <|endoftext|>, inside a smaller vocabulary
    return GPT2Config(**{hf: getattr(cfg, name) for name, hf in _CONFIG_FIELDS.items()},
                      activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                      bos_token_id=end, eos_token_id=end)


def config_to_hf(cfg: GPTConfig) -> dict:
    """The ``config.json`` of a kvlib ``GPTConfig``, as transformers writes GPT-2's (no
    transformers needed); ``config_from_hf`` reads it back to the same config."""
    if not cfg.qkv_bias:
        raise ValueError("GPT-2 (and HF's GPT2LMHeadModel) has a QKV bias; this config has none")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            **{hf: getattr(cfg, name) for name, hf in _CONFIG_FIELDS.items()},
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}


def save_pretrained(model: GPTModel, folder: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as Hugging Face's GPT-2 checkpoint (``model.safetensors`` without the tied
    head, ``config.json``), in ``dtype`` if given; ``from_pretrained(folder)`` loads it back."""
    sd = to_hf_state_dict(model)
    del sd["lm_head.weight"]  # tied: the same tensor as transformer.wte.weight
    return write_checkpoint(folder, sd, config_to_hf(model.cfg), dtype)


def config_from_hf(d: dict, source: str = "config.json") -> GPTConfig:
    """A kvlib ``GPTConfig`` from a GPT-2 ``config.json`` dict; an error for what kvlib lacks."""
    if "n_ctx" in d and "n_positions" not in d:  # OpenAI-era configs
        d = {**d, "n_positions": d["n_ctx"]}
    missing = [hf for hf in _CONFIG_FIELDS.values() if hf not in d]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing} of a GPT-2 config")
    unsupported = {
        "model_type": d.get("model_type", "gpt2") != "gpt2",
        "activation_function": d.get("activation_function", "gelu_new")
        not in ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": abs(d.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12,
        "n_inner": d.get("n_inner") not in (None, 4 * d["n_embd"]),
        "scale_attn_by_inverse_layer_idx": bool(d.get("scale_attn_by_inverse_layer_idx")),
        "scale_attn_weights": not d.get("scale_attn_weights", True),
        "tie_word_embeddings": not d.get("tie_word_embeddings", True),
        "add_cross_attention": bool(d.get("add_cross_attention")),
    }
    bad = {k: d.get(k) for k, is_bad in unsupported.items() if is_bad}
    if bad:
        raise ValueError(f"{source}: kvlib implements plain GPT-2 only; unsupported: {bad}")
    return GPTConfig(**{name: int(d[hf]) for name, hf in _CONFIG_FIELDS.items()})


def config_from_shapes(sd: dict[str, Tensor], source: str = "state dict") -> GPTConfig:
    """Guess the config of a GPT-2 state dict without config.json: sizes come from the tensors,
    the head count (no shape shows it) from the matching preset, else GPT-2's head size 64."""
    short = {k.removeprefix("transformer."): t for k, t in sd.items()}
    for name in ("wte.weight", "wpe.weight"):
        if name not in short:
            raise ValueError(f"{source}: missing tensor {name!r}: is this a GPT-2 checkpoint?")
    (vocab_size, emb_dim), context_length = short["wte.weight"].shape, short["wpe.weight"].shape[0]
    layers = {int(m.group(1)) for k in short if (m := re.match(r"h\.(\d+)\.", k))}
    n_layers = max(layers) + 1 if layers else 0
    preset = next((p for p in PRESETS.values() if (p.emb_dim, p.n_layers) == (emb_dim, n_layers)),
                  None)
    if preset is not None:
        n_heads = preset.n_heads
    elif emb_dim % 64 == 0:
        n_heads = emb_dim // 64
    else:
        raise ValueError(f"{source}: cannot tell the number of attention heads from the tensor "
                         f"shapes (emb_dim={emb_dim}); put GPT-2's config.json beside the file")
    return GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                     n_heads=n_heads, n_layers=n_layers)


def from_pretrained(name_or_path: str | os.PathLike) -> GPTModel:
    """OpenAI's GPT-2 in kvlib (eval mode, float32 as stored): a hub name or a local checkpoint.

    - ``"gpt2"``, ``"gpt2-medium"``, ``"gpt2-large"``, ``"gpt2-xl"`` (or
      ``"openai-community/gpt2"`` etc.): ``model.safetensors`` from the Hugging Face hub through
      ``huggingface_hub``'s cache (once, 0.5 to 6.4 GB); ``HF_HUB_OFFLINE=1``: cache only.
    - a directory holding ``model.safetensors`` (or shards listed in
      ``model.safetensors.index.json``) and optionally ``config.json`` (else the config is read off
      the tensor shapes), e.g. what ``GPT2LMHeadModel.save_pretrained`` writes;
    - a ``.safetensors`` file (config from ``config.json`` beside it, else from the shapes).

    An existing local path wins over a hub name. Only safetensors are read: pickled ``.bin``/``.pt``
    files can run code when loaded and are refused.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    repo = HUB_NAMES.get(name) or (name if name in HUB_NAMES.values() else None)
    if repo is not None and not path.exists():
        file = download(repo, "model.safetensors")
        sd = read_safetensors([file])
        return from_hf_state_dict(sd, PRESETS[repo.split("/")[1]], source=f"{repo} ({file})")
    files, config_file = local_files(path, name, HUB_NAMES)
    sd = read_safetensors(files)
    source = str(files[0] if len(files) == 1 else path)
    if config_file is not None:
        cfg = config_from_hf(json.loads(config_file.read_text()), source=str(config_file))
    else:
        cfg = config_from_shapes(sd, source=source)
    return from_hf_state_dict(sd, cfg, source=source)


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """kvlib name -> shape, read off a model built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _describe(cfg: GPTConfig) -> str:
    return (f"a GPT-2 with emb_dim={cfg.emb_dim}, n_layers={cfg.n_layers}, "
            f"vocab_size={cfg.vocab_size}, context_length={cfg.context_length}")
