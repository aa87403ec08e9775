"""gpt-oss checkpoints (transformers' ``GptOssForCausalLM``, ``model_type: gpt_oss``) in kvlib, and
back: safetensors only, with the experts' weights in plain floats.

kvlib's module names are transformers' less the ``model.`` prefix, with the same shapes (the
experts' ``(experts, in, out)`` included). OpenAI's released checkpoints store the experts in
MXFP4 (``quantization_config``, tensors ``*_blocks`` and ``*_scales``), which kvlib does not
decode: it refuses them and says how to dequantize them first. Also refused by name: RoPE types
but YaRN and plain, and a window on some layers but not as ``layer_types`` says.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..models.gpt_oss import GptOssConfig, GptOssModel, YarnScaling
from .files import assign_weights, local_files, read_safetensors, write_checkpoint
from .llama import hf_name

HUB_NAMES: dict[str, str] = {}  # the released weights are MXFP4: none loads as it is
MODEL_TYPES = ("gpt_oss",)
_ROPE_BUFFER = re.compile(r"rotary_emb\..*inv_freq")
_MXFP4 = ("dequantize the experts first, where transformers runs: GptOssForCausalLM."
          "from_pretrained(repo, quantization_config=Mxfp4Config(dequantize=True))"
          ".save_pretrained(folder), then load the folder")


def _rope(d: dict, source: str) -> tuple[float, YarnScaling | None]:
    """RoPE's theta and YaRN scaling from ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (transformers 4)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or d.get("rope_theta") or 150000.0)
    if kind == "default":
        return theta, None
    if kind != "yarn" or params.get("attention_factor") is not None or params.get("mscale"):
        raise ValueError(f"{source}: RoPE {params} is not supported; kvlib implements plain "
                         "RoPE and gpt-oss's YaRN (no attention_factor or mscale given)")
    return theta, YarnScaling(
        factor=float(params["factor"]), beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        original_context_length=int(params["original_max_position_embeddings"]),
        truncate=bool(params.get("truncate", True)))


def config_from_hf(d: dict, source: str = "config.json") -> GptOssConfig:
    """A kvlib ``GptOssConfig`` from a ``GptOssConfig``'s ``config.json`` dict; a
    ``ValueError`` naming ``source`` for anything kvlib does not implement."""
    if d.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not gpt_oss")
    if d.get("quantization_config"):
        raise ValueError(f"{source}: the experts are quantized "
                         f"({d['quantization_config'].get('quant_method')}); {_MXFP4}")
    theta, scaling = _rope(d, source)
    heads = int(d["num_attention_heads"])
    try:
        return GptOssConfig(
            vocab_size=int(d["vocab_size"]), context_length=int(d["max_position_embeddings"]),
            emb_dim=int(d["hidden_size"]), n_heads=heads,
            n_kv_heads=int(d.get("num_key_value_heads") or heads),
            n_layers=int(d["num_hidden_layers"]), ffn_dim=int(d["intermediate_size"]),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            n_experts=int(d["num_local_experts"]), experts_per_token=int(d["num_experts_per_tok"]),
            sliding_window=int(d["sliding_window"]),
            layer_types=tuple(d["layer_types"]) if d.get("layer_types") else None,
            rope_theta=theta, rope_scaling=scaling,
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
            attention_bias=bool(d.get("attention_bias", True)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source}: {e!r} in a gpt_oss config") from e


def config_to_hf(cfg: GptOssConfig) -> dict:
    """The ``config.json`` of a kvlib config (transformers 5's ``rope_parameters``)."""
    s = cfg.rope_scaling
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta} if s is None else {
        "rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": s.factor,
        "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate,
        "original_max_position_embeddings": s.original_context_length}
    return dict(
        model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.context_length, hidden_size=cfg.emb_dim,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        num_hidden_layers=cfg.n_layers, intermediate_size=cfg.ffn_dim, head_dim=cfg.head_dim,
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
        sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types),
        rope_parameters=rope, swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha,
        attention_bias=cfg.attention_bias, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)


def to_hf_model(model: GptOssModel, **config_overrides):
    """A transformers ``GptOssForCausalLM`` (eval mode) with a copy of ``model``'s weights."""
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM

    fields = config_to_hf(model.cfg)
    del fields["model_type"], fields["architectures"]
    p = next(model.parameters())
    hf = GptOssForCausalLM(HFConfig(**fields, **config_overrides))
    hf = hf.to(device=p.device, dtype=p.dtype)
    hf.load_state_dict({hf_name(n): t for n, t in model.state_dict().items()})
    return hf.eval()


def save_pretrained(model: GptOssModel, folder: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a transformers checkpoint (``model.safetensors``, ``config.json``)."""
    sd = {hf_name(n): t for n, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del sd["lm_head.weight"]
    return write_checkpoint(folder, sd, config_to_hf(model.cfg), dtype)


def from_hf_state_dict(sd: dict[str, Tensor], cfg: GptOssConfig, source: str = "state dict"
                       ) -> GptOssModel:
    """A kvlib ``GptOssModel`` (eval mode, the tensors' dtype) from a state dict in HF's
    layout; a missing, unexpected or misshapen tensor raises a ``ValueError`` naming it."""
    packed = [k for k in sd if k.endswith(("_blocks", "_scales"))]
    if packed:
        raise ValueError(f"{source}: {packed[0]!r} is an MXFP4-packed tensor; {_MXFP4}")
    with torch.device("meta"):  # no time spent on a random init that is overwritten at once
        model = GptOssModel(cfg)
    assign_weights(model, sd, source, computed=_ROPE_BUFFER, tied_head=cfg.tie_embeddings)
    model.arrange_weights()  # the fast layout for decoding; also ties the head again
    emb = model.embed_tokens.weight
    model.rope.build(cfg.context_length, device=emb.device, dtype=emb.dtype)  # was on meta
    return model.eval()


def from_pretrained(name_or_path: str | os.PathLike) -> GptOssModel:
    """A gpt-oss checkpoint in kvlib (eval mode, in the dtype stored): a local folder with
    ``config.json`` and ``model.safetensors`` (or shards), or a ``.safetensors`` file with
    ``config.json`` beside it, the experts in plain floats."""
    name = os.fspath(name_or_path)
    files, config_file = local_files(Path(name).expanduser(), name, HUB_NAMES)
    if config_file is None:
        raise FileNotFoundError(f"{name!r}: no config.json beside the weights; a gpt-oss "
                                "checkpoint needs it (experts, layer types, RoPE)")
    cfg = config_from_hf(json.loads(Path(config_file).read_text()), source=str(config_file))
    source = str(files[0]) if len(files) == 1 else str(Path(files[0]).parent)
    return from_hf_state_dict(read_safetensors(files), cfg, source=source)
