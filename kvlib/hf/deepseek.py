"""DeepSeek-V3 checkpoints in Hugging Face's layout (transformers' ``DeepseekV3ForCausalLM``), in
kvlib, and back: dense layers only, safetensors only.

kvlib's module names are transformers', so kvlib's ``layers.0.self_attn.kv_a_proj_with_mqa.weight``
is HF's ``model.layers.0.self_attn.kv_a_proj_with_mqa.weight`` (``lm_head.weight`` is the same in
both), with the same ``(out, in)`` shape: no transposes, no reordering (the interleaved RoPE
channels are de-interleaved on the fly, as transformers does).

What kvlib does not implement is refused with the fix, never loaded wrong: mixture-of-experts
layers (the released DeepSeek-V3 is one from layer ``first_k_dense_replace`` on; a dense model has
``first_k_dense_replace = num_hidden_layers``), RoPE scaling (the release's YaRN, which also
changes the softmax scale through ``mscale_all_dim``), attention biases, other activations.
``num_key_value_heads`` means nothing to latent attention (``kv_b_proj`` gives every query head
its own key and value) and is ignored; so are weights of layers past ``num_hidden_layers`` (the
release's multi-token-prediction module, which transformers skips too). No dense DeepSeek-V3 is
published, so there are no hub names: a checkpoint is a local folder, as ``save_pretrained``
writes it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..models.deepseek import DeepseekConfig, DeepseekModel
from .files import few, local_files, read_safetensors, write_checkpoint

HUB_NAMES: dict[str, str] = {}  # no dense DeepSeek-V3 on the hub
MODEL_TYPES = ("deepseek_v3",)  # config.json's model_type values this module loads
_REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings", "q_lora_rank", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
_SKIPPED = re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")  # computed by kvlib
_LAYER = re.compile(r"layers\.(\d+)\.")


def hf_name(name: str) -> str:
    """The HF name of a kvlib tensor: ``model.`` in front of everything but ``lm_head``."""
    return name if name.startswith("lm_head.") else f"model.{name}"


# --- configs -------------------------------------------------------------------------------------


def config_from_hf(d: dict, source: str = "config.json") -> DeepseekConfig:
    """A kvlib ``DeepseekConfig`` from a DeepSeek-V3 ``config.json`` dict; a ``ValueError`` naming
    ``source`` for anything kvlib does not implement (see the module's docstring)."""
    if d.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not one "
                         f"kvlib.hf.deepseek loads ({', '.join(MODEL_TYPES)})")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing} of a deepseek_v3 config")
    _check_dense(d, source)
    unsupported = {"attention_bias": bool(d.get("attention_bias")),
                   "hidden_act": d.get("hidden_act", "silu") != "silu"}
    bad = {k: d.get(k) for k, is_bad in unsupported.items() if is_bad}
    if bad:
        raise ValueError(f"{source}: kvlib implements DeepSeek-V3 without biases and with SiLU; "
                         f"unsupported: {bad}")
    q_rank = d["q_lora_rank"]
    try:
        return DeepseekConfig(
            vocab_size=int(d["vocab_size"]), context_length=int(d["max_position_embeddings"]),
            emb_dim=int(d["hidden_size"]), n_heads=int(d["num_attention_heads"]),
            n_layers=int(d["num_hidden_layers"]), ffn_dim=int(d["intermediate_size"]),
            q_lora_rank=None if q_rank is None else int(q_rank),
            kv_lora_rank=int(d["kv_lora_rank"]), qk_nope_head_dim=int(d["qk_nope_head_dim"]),
            qk_rope_head_dim=int(d["qk_rope_head_dim"]), v_head_dim=int(d["v_head_dim"]),
            rope_theta=_rope_theta(d, source), rope_interleave=bool(d.get("rope_interleave", True)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings")))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def _check_dense(d: dict, source: str) -> None:
    """Refuse mixture-of-experts layers: transformers makes layer i one when
    ``i >= first_k_dense_replace``."""
    n_layers, k = int(d["num_hidden_layers"]), d.get("first_k_dense_replace", 3)
    if k is None or int(k) < n_layers:
        first = 0 if k is None else int(k)
        raise ValueError(
            f"{source}: layers {first}..{n_layers - 1} are mixture-of-experts layers "
            f"(first_k_dense_replace = {k} < num_hidden_layers = {n_layers}, with "
            f"n_routed_experts = {d.get('n_routed_experts', 256)}), which kvlib does not "
            "implement: it runs DeepSeek-V3's attention with dense SwiGLU MLPs only. For a dense "
            f"model set first_k_dense_replace = num_hidden_layers ({n_layers})")


def _rope_theta(d: dict, source: str) -> float:
    """RoPE's theta from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4); any RoPE
    scaling is refused."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer RoPE parameters are not supported: {params}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"{source}: RoPE type {kind!r} is not supported: kvlib implements DeepSeek-V3 with "
            "plain RoPE only (YaRN, the release's, also rescales the softmax through "
            "mscale_all_dim); load a config without rope scaling (rope_type 'default')")
    return float(params.get("rope_theta") or d.get("rope_theta") or 10000.0)


def config_to_hf(cfg: DeepseekConfig) -> dict:
    """The ``config.json`` of a kvlib config, in transformers 5's words (``rope_parameters``);
    every layer dense. No bos, eos or pad token: ``generate`` never stops early."""
    return dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
        hidden_size=cfg.emb_dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        first_k_dense_replace=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_interleave=cfg.rope_interleave, rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
        attention_bias=False, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)


def to_hf_config(cfg: DeepseekConfig, **overrides):
    """The transformers ``DeepseekV3Config`` of a kvlib config; ``overrides`` go to its
    constructor (e.g. ``attn_implementation="eager"``)."""
    from transformers import DeepseekV3Config

    fields = config_to_hf(cfg)
    del fields["model_type"], fields["architectures"]
    return DeepseekV3Config(**fields, **overrides)


# --- weights -------------------------------------------------------------------------------------


def to_hf_state_dict(model: DeepseekModel) -> dict[str, Tensor]:
    """The state dict of transformers' ``DeepseekV3ForCausalLM`` holding ``model``'s weights
    (its own tensors, in kvlib's transposed storage: ``.contiguous()`` them before saving)."""
    return {hf_name(name): t for name, t in model.state_dict().items()}


def save_pretrained(model: DeepseekModel, folder: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a transformers checkpoint (``model.safetensors``, without a tied head,
    and ``config.json``), in ``dtype`` if given; ``from_pretrained(folder)`` loads it back."""
    sd = to_hf_state_dict(model)
    if model.cfg.tie_embeddings:
        del sd["lm_head.weight"]  # the same tensor as model.embed_tokens.weight
    return write_checkpoint(folder, sd, config_to_hf(model.cfg), dtype)


def to_hf_model(model: DeepseekModel, **config_overrides):
    """A transformers ``DeepseekV3ForCausalLM`` (eval mode) with a copy of ``model``'s weights,
    on its device and in its dtype (the reference for tests)."""
    from transformers import DeepseekV3ForCausalLM

    p = next(model.parameters())
    hf = DeepseekV3ForCausalLM(to_hf_config(model.cfg, **config_overrides))
    hf = hf.to(device=p.device, dtype=p.dtype)
    hf.load_state_dict(to_hf_state_dict(model))
    return hf.eval()


def from_hf_state_dict(sd: dict[str, Tensor], cfg: DeepseekConfig, source: str = "state dict",
                       files: dict[str, str] | None = None) -> DeepseekModel:
    """A kvlib ``DeepseekModel`` (eval mode, the tensors' dtype) from a state dict in HF's layout.

    Keys may carry the ``model.`` prefix or not; stored RoPE frequencies and layers past
    ``cfg.n_layers`` (multi-token prediction) are skipped; a tied ``lm_head.weight`` may be
    absent, and if present must equal the embedding. A missing, unexpected or wrongly shaped
    tensor raises a ``ValueError`` naming it and its file (``files``: name -> file).
    """
    where = (files or {}).get
    with torch.device("meta"):  # shapes only: no memory, no time spent on a random init
        model = DeepseekModel(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    weights, unexpected = {}, []
    for key, tensor in sd.items():
        name = key if key.startswith("lm_head.") else key.removeprefix("model.")
        layer = _LAYER.match(name)
        if _SKIPPED.fullmatch(name) or (layer and int(layer[1]) >= cfg.n_layers):
            continue
        if name not in expected:
            unexpected.append(key)
        elif tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{where(key, source)}: tensor {key!r} has shape "
                             f"{tuple(tensor.shape)}, expected {expected[name]} for "
                             f"{_describe(cfg)}")
        else:
            weights[name] = tensor
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {few(unexpected)}: not part of "
                         f"{_describe(cfg)} (is config.json this checkpoint's own?)")
    _tie(weights, cfg, where, source)
    missing = [hf_name(n) for n in expected if n not in weights]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {few(missing)} for {_describe(cfg)}")
    model.load_state_dict(weights, assign=True)
    model.arrange_weights()  # the fast layout for decoding; also ties the head again
    emb = model.embed_tokens.weight
    model.rope.build(cfg.context_length, device=emb.device, dtype=emb.dtype)  # was on meta
    return model.eval()


def _tie(weights: dict[str, Tensor], cfg: DeepseekConfig, where, source: str) -> None:
    """A tied head is the embedding: a stored copy must equal it."""
    if not cfg.tie_embeddings:
        return
    head, emb = weights.pop("lm_head.weight", None), weights.get("embed_tokens.weight")
    if head is not None and emb is not None and not torch.equal(head, emb):
        raise ValueError(f"{where('lm_head.weight', source)}: 'lm_head.weight' differs from "
                         "'model.embed_tokens.weight', but config.json ties them "
                         "(tie_word_embeddings): set it to false to keep both")
    if emb is not None:
        weights["lm_head.weight"] = emb


def from_pretrained(name_or_path: str | os.PathLike) -> DeepseekModel:
    """A DeepSeek-V3 checkpoint (dense layers) in kvlib, in the dtype stored: a local directory
    holding ``config.json`` and ``model.safetensors`` (or the shards of its index), or one
    ``.safetensors`` file with ``config.json`` beside it. Pickled files are refused."""
    name = os.fspath(name_or_path)
    files, config_file = local_files(Path(name).expanduser(), name, HUB_NAMES)
    if config_file is None:
        raise FileNotFoundError(
            f"{name!r}: no config.json beside the weights; a DeepSeek-V3 checkpoint needs it "
            "(ranks, head sizes and RoPE settings cannot all be read off the tensors)")
    cfg = config_from_hf(json.loads(Path(config_file).read_text()), source=str(config_file))
    sd, origin = {}, {}
    for file in files:  # one file at a time, to name the file of a bad tensor
        part = read_safetensors([file])
        sd.update(part)
        origin.update(dict.fromkeys(part, str(file)))
    source = str(files[0]) if len(files) == 1 else str(Path(files[0]).parent)
    return from_hf_state_dict(sd, cfg, source=source, files=origin)


def _describe(cfg: DeepseekConfig) -> str:
    return (f"a DeepSeek-V3 with emb_dim={cfg.emb_dim}, n_layers={cfg.n_layers}, "
            f"n_heads={cfg.n_heads}, q_lora_rank={cfg.q_lora_rank}, "
            f"kv_lora_rank={cfg.kv_lora_rank}, qk_nope_head_dim={cfg.qk_nope_head_dim}, "
            f"qk_rope_head_dim={cfg.qk_rope_head_dim}, v_head_dim={cfg.v_head_dim}, "
            f"ffn_dim={cfg.ffn_dim}, vocab_size={cfg.vocab_size}"
            f"{', tied head' if cfg.tie_embeddings else ''}")
