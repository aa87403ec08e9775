"""Finding and reading checkpoints in the Hugging Face layout: safetensors only, never pickle.

A checkpoint is a hub name, a directory holding ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and usually ``config.json``, or one ``.safetensors`` file.
``safetensors`` and ``huggingface_hub`` are imported only when used (``pip install
"kvlib[pretrained]"``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

WEIGHTS_FILE = "model.safetensors"


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HOW = ("pass a hub name ({names}), a directory holding model.safetensors (+ config.json), or a "
        ".safetensors file")


def local_files(path: Path, name: str, hub_names: dict[str, str]
                ) -> tuple[list[Path], Path | None]:
    """The safetensors file(s) and the optional config.json of a local checkpoint."""
    how = _HOW.format(names=", ".join(hub_names))
    if path.suffix in _PICKLE_SUFFIXES or (path.is_dir() and not any(path.glob("*.safetensors*"))
                                           and any(path.glob("*.bin"))):
        raise ValueError(f"{name!r}: kvlib loads only safetensors, never pickled checkpoints "
                         "(.bin/.pt run code when loaded); convert it where you trust it, e.g. "
                         "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                         "safe_serialization=True)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{name!r} is not a .safetensors file; {how}")
        config = path.with_name("config.json")
        return [path], config if config.is_file() else None
    if path.is_dir():
        config = path / "config.json"
        config = config if config.is_file() else None
        if (path / WEIGHTS_FILE).is_file():
            return [path / WEIGHTS_FILE], config
        index = path / f"{WEIGHTS_FILE}.index.json"
        if index.is_file():  # a sharded checkpoint: weight_map names the file of every tensor
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) {missing}, not found in {path}")
            return [path / s for s in shards], config
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in directory {str(path)!r} (it holds "
                                f"{found or 'nothing'}); {how}")
    raise FileNotFoundError(f"{name!r} is neither a known model name nor an existing file or "
                            f"directory; {how}")


def read_safetensors(files: list[Path | str]) -> dict[str, Tensor]:
    """Every tensor of the given safetensors files (no pickle involved), on the CPU."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError("loading weights needs safetensors: pip install safetensors") from e
    sd: dict[str, Tensor] = {}
    for file in files:
        try:
            sd.update(load_file(file, device="cpu"))
        except Exception as e:  # SafetensorError for a truncated or foreign file
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
    return sd


def write_checkpoint(folder: str | os.PathLike, tensors: dict[str, Tensor], config: dict,
                     dtype: torch.dtype | None = None) -> Path:
    """Write ``model.safetensors`` (every tensor contiguous, cast to ``dtype`` if given) and
    ``config.json`` into ``folder`` (created if need be); return the folder."""
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError('saving weights needs safetensors: pip install "kvlib[pretrained]"'
                          ) from e
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {name: (t if dtype is None else t.to(dtype)).detach().cpu().contiguous()
           for name, t in tensors.items()}
    save_file(out, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, when imported)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")
    if flag is None:
        return constants.HF_HUB_OFFLINE
    return flag.upper() in ("1", "ON", "YES", "TRUE")


def download(repo: str, filename: str) -> str:
    """The path of ``repo``'s ``filename`` in huggingface_hub's cache (fetched if need be)."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError as e:
        raise ImportError('downloading weights needs huggingface_hub: '
                          'pip install "kvlib[pretrained]"') from e
    offline = _hub_offline()
    try:
        return hf_hub_download(repo, filename, local_files_only=offline)
    except Exception as e:  # offline, unreachable, not cached, gated, ...: all end the same way
        why = ("HF_HUB_OFFLINE is set and it is not in the hub cache" if offline else
               "the hub could not be reached and it is not in the hub cache")
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise OSError(
            f"could not get {filename} of {repo}: {why} {constants.HF_HUB_CACHE} "
            f"({type(e).__name__}: {first_line})\n"
            f"To load it without the hub, download https://huggingface.co/{repo}/resolve/main/"
            f"{filename} (and config.json) on a machine with internet, then pass the file or "
            f"its directory: kvlib.load_model('/path/to/{filename}', pretrained=True). Or copy a "
            "hub cache that holds it to this machine and point HF_HUB_CACHE at it."
        ) from e


def few(names: list[str], n: int = 5) -> str:
    """The first ``n`` names quoted, and how many more: for error messages."""
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def assign_weights(model: torch.nn.Module, sd: dict[str, Tensor], source: str,
                   computed: re.Pattern | None = None, tied_head: bool = False) -> None:
    """Put the tensors of ``sd`` (Hugging Face names: ``model.`` before every name but
    ``lm_head``'s, or no prefix at all) into ``model``, built on the meta device, as they are
    (``load_state_dict(assign=True)``: no copy). ``computed`` matches the names of tensors kvlib
    computes from the config (RoPE frequencies), which are skipped; a ``tied_head`` is the
    embedding, so ``lm_head.weight`` may be absent. A missing, unexpected or misshapen tensor
    raises a ``ValueError`` naming it and ``source``."""
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    weights = {}
    for key, tensor in sd.items():
        name = key if key.startswith("lm_head.") else key.removeprefix("model.")
        if computed is not None and computed.search(name):
            continue
        if tied_head and name == "lm_head.weight":
            continue  # the embedding is the head
        if name not in expected or tuple(tensor.shape) != expected[name]:
            want = expected.get(name, "no such tensor")
            raise ValueError(f"{source}: tensor {key!r} of shape {tuple(tensor.shape)} does not "
                             f"fit this config ({want}); is config.json this checkpoint's own?")
        weights[name] = tensor
    missing = [n for n in expected if n not in weights
               and not (tied_head and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {few(missing)} for this config")
    if tied_head:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model.load_state_dict(weights, assign=True)
