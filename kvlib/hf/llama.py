"""Llama 3 and Qwen3 checkpoints in Hugging Face's layout, in kvlib, and back: safetensors only.

kvlib's module names are those of transformers' ``LlamaForCausalLM`` / ``Qwen3ForCausalLM``, so a
kvlib tensor ``layers.0.self_attn.q_proj.weight`` is HF's ``model.layers.0.self_attn.q_proj.weight``
(``lm_head.weight`` is the same in both), with the same ``(out, in)`` shape: no transposes. A head
tied to the embedding (Llama 3.2 1B, Qwen3 0.6B) is usually absent from the files.

A checkpoint is a hub name (``HUB_NAMES``) or a local folder with ``config.json`` and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``), as
``save_pretrained`` writes it. ``safetensors``, ``huggingface_hub`` and ``transformers`` are
imported only when used; nothing here unpickles a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..models.llama import Llama3RopeScaling, LlamaConfig, LlamaModel
from .files import WEIGHTS_FILE, download, few, local_files, read_safetensors, write_checkpoint

HUB_NAMES = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",  # gated: accept Meta's license on the hub first
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-8b": "Qwen/Qwen3-8B",
}
_SINGLE_FILE = {"meta-llama/Llama-3.2-1B", "Qwen/Qwen3-0.6B"}  # the others are sharded
MODEL_TYPES = ("llama", "qwen3")  # config.json's model_type values this module loads
# RoPE frequencies that some converted checkpoints store: kvlib computes them from the config.
_ROPE_BUFFER = re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def hf_name(name: str) -> str:
    """The HF name of a kvlib tensor: ``model.`` in front of everything but ``lm_head``."""
    return name if name.startswith("lm_head.") else f"model.{name}"


# --- configs -------------------------------------------------------------------------------------


def config_from_hf(d: dict, source: str = "config.json") -> LlamaConfig:
    """A kvlib ``LlamaConfig`` from a Llama or Qwen3 ``config.json`` dict; a ``ValueError`` naming
    ``source`` for anything kvlib does not implement (biases, other activations or RoPE types,
    Qwen3's per-layer sliding windows)."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not one kvlib.hf.llama loads "
                         f"({', '.join(MODEL_TYPES)})")
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing} of a {model_type} config")
    unsupported = {
        "attention_bias": bool(d.get("attention_bias")),
        "mlp_bias": bool(d.get("mlp_bias")),
        "hidden_act": d.get("hidden_act", "silu") != "silu",
        "use_sliding_window": bool(d.get("use_sliding_window")),
        "layer_types": any(t != "full_attention" for t in d.get("layer_types") or []),
        "partial_rotary_factor": d.get("partial_rotary_factor", 1.0) != 1.0,
    }
    bad = {k: d.get(k) for k, is_bad in unsupported.items() if is_bad}
    if bad:
        raise ValueError(f"{source}: kvlib implements plain Llama 3 / Qwen3 only; "
                         f"unsupported: {bad}")
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    if not d.get("head_dim") and hidden % heads:
        raise ValueError(f"{source}: hidden_size ({hidden}) is not divisible by "
                         f"num_attention_heads ({heads}) and no head_dim is given")
    theta, scaling = _rope_from_hf(d, source)
    try:
        return LlamaConfig(
            vocab_size=int(d["vocab_size"]), context_length=int(d["max_position_embeddings"]),
            emb_dim=hidden, n_heads=heads, n_kv_heads=int(d.get("num_key_value_heads") or heads),
            n_layers=int(d["num_hidden_layers"]), ffn_dim=int(d["intermediate_size"]),
            head_dim=int(d.get("head_dim") or hidden // heads), rope_theta=theta,
            rope_scaling=scaling, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            qk_norm=model_type == "qwen3", tie_embeddings=bool(d.get("tie_word_embeddings")))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _rope_from_hf(d: dict, source: str) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE's theta and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer RoPE parameters are not supported: {params}")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or d.get("rope_theta") or 10000.0)
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{source}: RoPE type {kind!r} is not supported; kvlib implements plain "
                         "RoPE ('default') and Llama 3's scaling ('llama3')")
    try:
        return theta, Llama3RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_context_length=int(params.get("original_max_position_embeddings")
                                        or d["max_position_embeddings"]))
    except KeyError as e:
        raise ValueError(f"{source}: the llama3 RoPE scaling lacks {e.args[0]!r}") from e


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The ``config.json`` of a kvlib config, as transformers 4 writes it (``rope_theta`` and
    ``rope_scaling`` on top; no transformers needed); ``config_from_hf`` reads it back. No bos,
    eos or pad token: kvlib's configs have none, so ``generate`` never stops early."""
    if cfg.attn_sinks:
        raise ValueError("no transformers Llama or Qwen3 has learned attention sinks "
                         "(attn_sinks=True: gpt-oss's): such a model has no checkpoint layout here")
    s = cfg.rope_scaling
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_context_length}
    qwen = cfg.qk_norm
    return dict(
        model_type="qwen3" if qwen else "llama",
        architectures=["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"],
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
        hidden_size=cfg.emb_dim, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, num_hidden_layers=cfg.n_layers,
        intermediate_size=cfg.ffn_dim, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        rope_scaling=scaling, rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
        attention_bias=False, **({} if qwen else {"mlp_bias": False}),
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)


def to_hf_config(cfg: LlamaConfig, **overrides):
    """The transformers ``LlamaConfig`` (or ``Qwen3Config`` when ``cfg.qk_norm``) of a kvlib
    config; ``overrides`` go to its constructor (e.g. ``attn_implementation="eager"``)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import Qwen3Config

    fields = config_to_hf(cfg)
    del fields["model_type"], fields["architectures"]
    return (Qwen3Config if cfg.qk_norm else HFLlamaConfig)(**fields, **overrides)


# --- weights -------------------------------------------------------------------------------------


def to_hf_state_dict(model: LlamaModel) -> dict[str, Tensor]:
    """The state dict of transformers' ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` holding
    ``model``'s weights: ``hf_model.load_state_dict(sd)`` (strict) copies them in.

    The tensors are ``model``'s own (no copy), in kvlib's transposed storage, so not contiguous:
    call ``.contiguous()`` on each before ``safetensors.torch.save_file``. A tied head appears as
    ``lm_head.weight``, the same tensor as ``model.embed_tokens.weight``.
    """
    return {hf_name(name): t for name, t in model.state_dict().items()}


def save_pretrained(model: LlamaModel, folder: str | os.PathLike,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a transformers checkpoint (``model.safetensors``, without a tied head,
    and ``config.json``), in ``dtype`` if given; ``from_pretrained(folder)`` loads it back."""
    sd = to_hf_state_dict(model)
    if model.cfg.tie_embeddings:
        del sd["lm_head.weight"]  # the same tensor as model.embed_tokens.weight
    return write_checkpoint(folder, sd, config_to_hf(model.cfg), dtype)


def to_hf_model(model: LlamaModel, **config_overrides):
    """A transformers ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` (eval mode) with a copy of
    ``model``'s weights, on its device and in its dtype (the reference for tests and benchmarks).
    """
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    cls = Qwen3ForCausalLM if model.cfg.qk_norm else LlamaForCausalLM
    p = next(model.parameters())
    hf = cls(to_hf_config(model.cfg, **config_overrides)).to(device=p.device, dtype=p.dtype)
    hf.load_state_dict(to_hf_state_dict(model))
    return hf.eval()


def from_hf_state_dict(sd: dict[str, Tensor], cfg: LlamaConfig, source: str = "state dict",
                       files: dict[str, str] | None = None) -> LlamaModel:
    """A kvlib ``LlamaModel`` (eval mode, the tensors' dtype) from a state dict in HF's layout.

    Keys may carry the ``model.`` prefix (``LlamaForCausalLM``) or not (``LlamaModel``); stored
    RoPE frequencies (``rotary_emb.inv_freq``) are ignored; a tied ``lm_head.weight`` may be
    absent, and if present must equal the embedding. A missing, unexpected or wrongly shaped
    tensor raises a ``ValueError`` naming it and its file (``files``: tensor name -> file; else
    ``source``). The model uses the tensors as they are (no copy).
    """
    where = (files or {}).get
    expected = _expected_shapes(cfg)
    weights, unexpected = {}, []
    for key, tensor in sd.items():
        name = key if key.startswith("lm_head.") else key.removeprefix("model.")
        if _ROPE_BUFFER.fullmatch(name):
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{where(key, source)}: tensor {key!r} has shape "
                             f"{tuple(tensor.shape)}, expected {expected[name]} for "
                             f"{_describe(cfg)}")
        weights[name] = tensor
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {few(unexpected)}: not part of "
                         f"{_describe(cfg)} (is config.json this checkpoint's own?)")
    if cfg.tie_embeddings and "lm_head.weight" in weights:
        head, emb = weights.pop("lm_head.weight"), weights.get("embed_tokens.weight")
        if emb is not None and not torch.equal(head, emb):
            raise ValueError(f"{where('lm_head.weight', source)}: 'lm_head.weight' differs from "
                             "'model.embed_tokens.weight', but config.json ties them "
                             "(tie_word_embeddings): set it to false to keep both")
    missing = [hf_name(n) for n in expected if n not in weights
               and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {few(missing)} for {_describe(cfg)}")

    with torch.device("meta"):  # no time spent on a random init that is overwritten at once
        model = LlamaModel(cfg)
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model.load_state_dict(weights, assign=True)
    model.arrange_weights()  # the fast layout for decoding; also ties the head again
    emb = model.embed_tokens.weight
    model.rope.build(cfg.context_length, device=emb.device, dtype=emb.dtype)  # was on meta
    return model.eval()


def from_pretrained(name_or_path: str | os.PathLike) -> LlamaModel:
    """A Llama 3 or Qwen3 checkpoint in kvlib (eval mode, in the dtype stored: bfloat16 for the
    released models; ``kvlib.load_model`` then casts).

    - a name in ``HUB_NAMES`` (``"qwen3-0.6b"``) or its hub id (``"Qwen/Qwen3-0.6B"``): the files
      from the Hugging Face hub through huggingface_hub's cache (``HF_HUB_OFFLINE=1``: cache only;
      Meta's repositories are gated: accept the license and log in first);
    - a directory holding ``config.json`` and ``model.safetensors`` or the shards listed in
      ``model.safetensors.index.json``; or one ``.safetensors`` file with ``config.json`` beside.

    An existing local path wins over a hub name. Pickled ``.bin``/``.pt`` files are refused.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    repo = HUB_NAMES.get(name) or (name if name in HUB_NAMES.values() else None)
    if repo is not None and not path.exists():
        config_file, files = _download(repo)
    else:
        files, config_file = local_files(path, name, HUB_NAMES)
        if config_file is None:
            raise FileNotFoundError(
                f"{name!r}: no config.json beside the weights; a Llama or Qwen3 checkpoint needs "
                "it (head counts and RoPE settings cannot be read off the tensors): copy the "
                "model's config.json next to them")
    cfg = config_from_hf(json.loads(Path(config_file).read_text()), source=str(config_file))
    sd, origin = {}, {}
    for file in files:  # one file at a time, to name the file of a bad tensor
        part = read_safetensors([file])
        sd.update(part)
        origin.update(dict.fromkeys(part, str(file)))
    source = str(files[0]) if len(files) == 1 else str(Path(files[0]).parent)
    return from_hf_state_dict(sd, cfg, source=source, files=origin)


def _download(repo: str) -> tuple[Path, list[Path]]:
    """config.json and the safetensors file(s) of a hub repository, through the hub cache."""
    config = Path(download(repo, "config.json"))
    if repo in _SINGLE_FILE:
        return config, [Path(download(repo, WEIGHTS_FILE))]
    index = Path(download(repo, f"{WEIGHTS_FILE}.index.json"))
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return config, [Path(download(repo, shard)) for shard in shards]


def _expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """kvlib name -> shape, read off a model built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _describe(cfg: LlamaConfig) -> str:
    family = "Qwen3" if cfg.qk_norm else "Llama"
    return (f"a {family} with emb_dim={cfg.emb_dim}, n_layers={cfg.n_layers}, "
            f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, "
            f"ffn_dim={cfg.ffn_dim}, vocab_size={cfg.vocab_size}"
            f"{', tied head' if cfg.tie_embeddings else ''}")
