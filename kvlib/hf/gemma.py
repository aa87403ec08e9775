"""Gemma 3 text checkpoints (transformers' ``Gemma3ForCausalLM``, ``model_type: gemma3_text``) in
kvlib, and back: safetensors only.

kvlib's module names are transformers' less the ``model.`` prefix, with the same ``(out, in)``
shapes; the head is tied to the embedding (and absent from the files) unless
``tie_word_embeddings`` is false. The config is read in both layouts: transformers 5's
``rope_parameters`` per layer type, or transformers 4's ``rope_theta``, ``rope_local_base_freq``
and ``rope_scaling``. What kvlib does not implement is refused by name: the multimodal
``gemma3`` checkpoints (load their text model's own folder), biases, other activations,
bidirectional attention, RoPE types other than plain and ``"linear"``, and
``attn_logit_softcapping`` (transformers' Gemma 3 stores it but never applies it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..models.gemma import GLOBAL, LOCAL, GemmaConfig, GemmaModel
from .files import assign_weights, download, local_files, read_safetensors, write_checkpoint
from .llama import hf_name

HUB_NAMES = {"gemma-3-1b": "google/gemma-3-1b-pt",  # gated: accept Google's license first
             "gemma-3-270m": "google/gemma-3-270m"}
MODEL_TYPES = ("gemma3_text",)
_ROPE_BUFFER = re.compile(r"rotary_emb\..*inv_freq")  # computed from the config, never loaded


def _refused(d: dict) -> dict:
    """The fields of a ``config.json`` that kvlib's Gemma does not implement, with their values."""
    unsupported = {
        "attention_bias": bool(d.get("attention_bias")),
        "hidden_activation": d.get("hidden_activation", "gelu_pytorch_tanh")
        != "gelu_pytorch_tanh",
        "use_bidirectional_attention": bool(d.get("use_bidirectional_attention")),
        "attn_logit_softcapping": d.get("attn_logit_softcapping") is not None,
    }
    return {k: d.get(k) for k, bad in unsupported.items() if bad}


def _rope(d: dict, source: str) -> tuple[float, float, float | None]:
    """Global theta, local theta and the global layers' linear factor (None: no scaling)."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and GLOBAL in params:  # transformers 5
        full, local = params.get(GLOBAL) or {}, params.get(LOCAL) or {}
    else:  # transformers 4
        full = {"rope_theta": d.get("rope_theta", 1000000.0), **(d.get("rope_scaling") or {})}
        local = {"rope_theta": d.get("rope_local_base_freq", 10000.0)}
    kinds = {t: p.get("rope_type", p.get("type", "default")) for t, p in
             ((GLOBAL, full), (LOCAL, local))}
    if kinds[LOCAL] != "default" or kinds[GLOBAL] not in ("default", "linear") \
            or full.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: RoPE {kinds} is not supported; kvlib implements plain "
                         "RoPE on every layer and 'linear' scaling on the global ones")
    factor = float(full["factor"]) if kinds[GLOBAL] == "linear" else None
    return float(full.get("rope_theta", 1000000.0)), float(local.get("rope_theta", 10000.0)), \
        factor


def config_from_hf(d: dict, source: str = "config.json") -> GemmaConfig:
    """A kvlib ``GemmaConfig`` from a ``Gemma3TextConfig``'s ``config.json`` dict; a
    ``ValueError`` naming ``source`` for anything kvlib does not implement."""
    if d.get("model_type") == "gemma3":
        raise ValueError(f"{source}: a multimodal Gemma 3 (model_type 'gemma3', with a vision "
                         "tower); kvlib loads the text model only (model_type 'gemma3_text', "
                         "Gemma3ForCausalLM)")
    if d.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not gemma3_text")
    bad = _refused(d)
    if bad:
        raise ValueError(f"{source}: kvlib implements Gemma 3's text model as transformers "
                         f"runs it; unsupported: {bad}")
    theta, local_theta, factor = _rope(d, source)
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    types = d.get("layer_types")
    try:
        return GemmaConfig(
            vocab_size=int(d["vocab_size"]), context_length=int(d["max_position_embeddings"]),
            emb_dim=hidden, n_heads=heads, n_kv_heads=int(d.get("num_key_value_heads") or heads),
            n_layers=int(d["num_hidden_layers"]), ffn_dim=int(d["intermediate_size"]),
            head_dim=int(d.get("head_dim") or hidden // heads),
            sliding_window=int(d["sliding_window"]),
            layer_types=tuple(types) if types else None,
            sliding_window_pattern=int(d.get("sliding_window_pattern")
                                       or d.get("_sliding_window_pattern") or 6),
            rope_theta=theta, rope_local_theta=local_theta, rope_scaling_factor=factor,
            query_pre_attn_scalar=int(d.get("query_pre_attn_scalar", 256)),
            final_softcap=d.get("final_logit_softcapping"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", True)))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source}: {e!r} in a gemma3_text config") from e


def config_to_hf(cfg: GemmaConfig) -> dict:
    """The ``config.json`` of a kvlib config, in transformers 5's layout (``rope_parameters``
    per layer type); ``config_from_hf`` reads it back. No bos, eos or pad token."""
    if cfg.attn_softcap is not None:
        raise ValueError("transformers' Gemma 3 ignores attn_logit_softcapping, so a model "
                         "with attn_softcap has no Gemma3ForCausalLM twin")
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor is not None:
        full.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    return dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
        hidden_size=cfg.emb_dim, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, num_hidden_layers=cfg.n_layers,
        intermediate_size=cfg.ffn_dim, head_dim=cfg.head_dim, sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types),
        rope_parameters={GLOBAL: full, LOCAL: {"rope_type": "default",
                                               "rope_theta": cfg.rope_local_theta}},
        query_pre_attn_scalar=cfg.query_pre_attn_scalar, final_logit_softcapping=cfg.final_softcap,
        attn_logit_softcapping=None, rms_norm_eps=cfg.rms_norm_eps,
        hidden_activation="gelu_pytorch_tanh", attention_bias=False,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)


def to_hf_model(model: GemmaModel, **config_overrides):
    """A transformers ``Gemma3ForCausalLM`` (eval mode) with a copy of ``model``'s weights, on
    its device and in its dtype (the reference for tests)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    fields = config_to_hf(model.cfg)
    del fields["model_type"], fields["architectures"]
    p = next(model.parameters())
    hf = Gemma3ForCausalLM(Gemma3TextConfig(**fields, **config_overrides))
    hf = hf.to(device=p.device, dtype=p.dtype)
    hf.load_state_dict({hf_name(n): t for n, t in model.state_dict().items()})
    return hf.eval()


def save_pretrained(model: GemmaModel, folder: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a transformers checkpoint (``model.safetensors``, without a tied head,
    and ``config.json``), in ``dtype`` if given; ``from_pretrained(folder)`` loads it back."""
    sd = {hf_name(n): t for n, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del sd["lm_head.weight"]  # the same tensor as model.embed_tokens.weight
    return write_checkpoint(folder, sd, config_to_hf(model.cfg), dtype)


def from_hf_state_dict(sd: dict[str, Tensor], cfg: GemmaConfig, source: str = "state dict"
                       ) -> GemmaModel:
    """A kvlib ``GemmaModel`` (eval mode, the tensors' dtype) from a state dict in HF's
    layout (with or without the ``model.`` prefix); a missing, unexpected or wrongly shaped
    tensor raises a ``ValueError`` naming it. The model uses the tensors as they are."""
    with torch.device("meta"):  # no time spent on a random init that is overwritten at once
        model = GemmaModel(cfg)
    assign_weights(model, sd, source, computed=_ROPE_BUFFER, tied_head=cfg.tie_embeddings)
    model.arrange_weights()  # the fast layout for decoding; also ties the head again
    emb = model.embed_tokens.weight
    for rope in (model.rope_local, model.rope_global):  # the tables were built on meta
        rope.build(cfg.context_length, device=emb.device, dtype=emb.dtype)
    return model.eval()


def from_pretrained(name_or_path: str | os.PathLike) -> GemmaModel:
    """A Gemma 3 text checkpoint in kvlib (eval mode, in the dtype stored): a name in
    ``HUB_NAMES`` or its hub id (through huggingface_hub's cache), or a local folder with
    ``config.json`` and ``model.safetensors`` (or shards), or a ``.safetensors`` file with
    ``config.json`` beside it."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    repo = HUB_NAMES.get(name) or (name if name in HUB_NAMES.values() else None)
    if repo is not None and not path.exists():
        config_file, files = Path(download(repo, "config.json")), [
            Path(download(repo, "model.safetensors"))]
    else:
        files, config_file = local_files(path, name, HUB_NAMES)
        if config_file is None:
            raise FileNotFoundError(f"{name!r}: no config.json beside the weights; a Gemma 3 "
                                    "checkpoint needs it (its layer types and RoPE bases)")
    cfg = config_from_hf(json.loads(Path(config_file).read_text()), source=str(config_file))
    source = str(files[0]) if len(files) == 1 else str(Path(files[0]).parent)
    return from_hf_state_dict(read_safetensors(files), cfg, source=source)
