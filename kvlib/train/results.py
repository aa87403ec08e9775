"""The end of a run: the weights as shipped, their held-out score, the metrics file, the loss
curve. Every number of the model card (``card.py``) is read from the metrics file written here.

The held-out score is measured on the model *as shipped*: written in bfloat16, loaded back with
``kvlib.load_model`` (float32), then scored on ``test_slice.json``, the fixed windows of the test
split saved beside the weights, so a test can reproduce it on any machine and Python version.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import loading
from ..evaluate import (
    LONG_FILE,
    SLICE_FILE,
    SLICE_FORMAT,
    load_test_slice,
    perplexity,
    windows_sha256,
)
from ..generate import generate
from ..loading import load_model, save_model
from ..machine import environment_info
from ..models import CausalLM, GPTModel
from ..passkey import MAX_VALUE_TOKENS, passkeys_for, recall
from ..plots.figure import figure_png
from ..plots.training import plot_training
from .config import TrainConfig
from .data import TokenData, consecutive_windows, fixed_windows
from .loop import Trainer
from .quality import compare_with, parse_share

METRICS_FILE, LOSS_FILE = "metrics.json", "loss.png"
LONG_TOKENS = 4096  # several times the mini models' context (256 tokens, or 512, 1024)
PROMPTS = ("def fibonacci(n):\n", 'class Stack:\n    """', "import os\nimport sys\n\n\ndef main(")
SAMPLE_TOKENS = 60
RECALL_EPISODES = 64  # held-out passkey episodes per distance


def save_test_slice(windows: torch.Tensor, path: Path, source: str = "") -> None:
    """The held-out windows as token ids (one window per line); ``source`` says where from."""
    rows = ",\n".join(json.dumps(w) for w in windows.tolist())
    path.write_text(f'{{"format": "{SLICE_FORMAT}", "sha256": "{windows_sha256(windows)}", '
                    f'"source": {json.dumps(source)}, "windows": [\n{rows}\n]}}\n')


def long_text(data: TokenData, tokens: int = LONG_TOKENS, bos: bool = False
              ) -> tuple[torch.Tensor, str]:
    """The first ``tokens`` tokens of the longest file of the test split (``(1, tokens)``, fewer
    if that file is shorter), and its name: one file, so that a name defined early and used late
    is really the same name. With ``bos``: ``<|endoftext|>`` and ``tokens - 1`` of the file."""
    ids, eot = data.ids["test"], data.tokenizer.eot_id
    ends = np.flatnonzero(ids == eot)
    starts = np.r_[0, ends[:-1] + 1]
    longest = int(np.argmax(ends - starts))
    start = int(starts[longest])
    end = min(start + tokens - bos, int(ends[longest]))
    window = torch.from_numpy(np.r_[[eot] * bos, ids[start:end]].astype(np.int64))[None]
    return window, data.manifest.get("test_files", [None] * len(ends))[longest] or ""


def save_long_text(data: TokenData, out: Path, bos: bool = False) -> None:
    """Write ``test_long.json`` into ``out`` (``python -m kvlib.train --long-text`` does it for
    models trained before it existed); ``bos`` as the model was trained."""
    window, name = long_text(data, bos=bos)
    start = "<|endoftext|>, then " if bos else ""
    save_test_slice(window, out / LONG_FILE,
                    f"{start}the first {window.shape[1] - bos} tokens of {name}")


def score(model: CausalLM, windows: torch.Tensor) -> dict:
    result = perplexity(model, windows, batch_size=16)
    return {"windows": windows.shape[0], "window_tokens": windows.shape[1],
            "tokens_scored": result.tokens, "mean_nll": result.mean_nll,
            "perplexity": result.perplexity, "sha256": windows_sha256(windows)}


def samples(model: CausalLM, bos: bool = False) -> list[dict]:
    """Greedy continuations of a few prompts (the prealloc cache), within the context; after
    ``<|endoftext|>`` with ``bos``, as the model was trained."""
    tok = model.tokenizer
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([[tok.eot_id] * bos + tok.encode(prompt)])
        n = min(SAMPLE_TOKENS, model.cfg.context_length - ids.shape[1])
        tokens = generate(model, ids, n, cache="prealloc").tokens[0, ids.shape[1]:]
        out.append({"prompt": prompt, "completion": tok.decode(tokens.tolist())})
    return out


def recall_scores(model: CausalLM, data: TokenData, bos: bool, n: int = RECALL_EPISODES
                  ) -> list[dict]:
    """Passkey recall on held-out episodes (the test split's code), full attention, at a few
    distances up to the longest that fits the context."""
    ctx = model.cfg.context_length
    keys = passkeys_for(data.tokenizer)
    prefix = min(16, ctx // 8)
    longest = ctx - bos - prefix - keys.max_head - MAX_VALUE_TOKENS - 1
    distances = sorted({d for d in (ctx // 8, ctx // 4, ctx // 2, longest)
                        if keys.min_distance <= d <= longest})
    out = []
    for d in distances:
        r = recall(model, distance=d, n=n, prefix=prefix, bos=bos, filler=data.ids["test"])
        out.append({"distance": d, "episodes": n, "accuracy": r.accuracy,
                    "token_accuracy": r.token_accuracy, "without_binding": r.without_binding,
                    "chance": r.chance})
    return out


def earlier_phase(cfg: TrainConfig) -> dict | None:
    """What the run in ``cfg.init_from`` was (its metrics): where this one's weights began."""
    if cfg.init_from is None:
        return None
    m = json.loads((Path(cfg.init_from) / METRICS_FILE).read_text())
    return {"folder": cfg.init_from, "steps": m["steps"], "tokens_seen": m["tokens_seen"],
            "seconds": m["seconds"], "command": m["command"], "reproduce": m["reproduce"],
            "train": m["train"], "init_from": m.get("init_from")}


def finish(trainer: Trainer, command: str | None = None) -> dict:
    """Write the weights, score them, write ``metrics.json`` and ``loss.png``; the metrics."""
    cfg, data = trainer.cfg, trainer.data
    out = cfg.out_dir
    ctx = cfg.arch.context_length
    save_model(trainer.model, out)  # bfloat16 safetensors, config.json, vocab.json
    windows = fixed_windows(data.ids["test"], cfg.test_windows, ctx, trainer.bos_id)
    save_test_slice(windows, out / SLICE_FILE)
    save_long_text(data, out, cfg.bos)
    shipped = load_model(out)  # float32, as a reader gets it
    whole = consecutive_windows(data.ids["test"], ctx, trainer.bos_id)
    metrics = {
        "model": cfg.model, "family": "gpt2" if isinstance(shipped, GPTModel) else "llama",
        "config": asdict(cfg.arch),
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "train": cfg.to_dict(), "steps": trainer.step, "total_steps": trainer.total_steps,
        "stopped_by": trainer.stopped_by, "tokens_per_step": trainer.tokens_per_step,
        "tokens_seen": trainer.step * trainer.tokens_per_step,
        "epochs": trainer.batches.epoch_of(trainer.step),
        "seconds": trainer.seconds, "step_seconds": trainer.step_seconds,
        "tokens_per_s": trainer.step * trainer.tokens_per_step / max(trainer.step_seconds, 1e-9),
        "final_train_loss": float(np.mean(trainer.history["loss"][-50:])),
        "valid_loss": trainer.history["valid_loss"][-1],
        "test": score(shipped, windows), "test_full": score(shipped, whole),
        "recall": recall_scores(shipped, data, cfg.bos),
        "corpus": data.manifest, "vocab_size": data.tokenizer.vocab_size,
        "samples": samples(shipped, cfg.bos), "sample_tokens": SAMPLE_TOKENS,
        "parses": parse_share(shipped, data, cfg.bos),
        "reproduce": cfg.command(trainer.total_steps, None if trainer.step == trainer.total_steps
                                 else trainer.step) + f" --threads {torch.get_num_threads()}",
        "command": command or " ".join(["python -m kvlib.train", *sys.argv[1:]]),
        "init_from": earlier_phase(cfg),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_info(),
        "history": {k: [round(v, 5) if isinstance(v, float) else v for v in vals]
                    for k, vals in trainer.history.items()},
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    (out / LOSS_FILE).write_bytes(figure_png(plot_training(metrics), dpi=100))
    return metrics


def record_comparison(name: str, folder: str | Path, data: TokenData) -> dict:
    """Measure the shipped model ``name`` against the one in ``folder`` (the weights it
    replaced, with their ``metrics.json`` and ``test_slice.json``): store it in the shipped
    metrics as ``previous`` (and ``parses``, if missing); the comparison."""
    folder, shipped_dir = Path(folder), loading.TRAINED_DIR / name
    metrics = json.loads((shipped_dir / METRICS_FILE).read_text())
    before = json.loads((folder / METRICS_FILE).read_text())
    model, previous = load_model(shipped_dir), load_model(folder)
    bos, previous_bos = (bool(m["train"].get("bos")) for m in (metrics, before))
    result = compare_with(model, bos, previous, previous_bos,
                          load_test_slice(folder / SLICE_FILE), data)
    result["source"] = (f"{before['steps']} steps, {before['config']['context_length']}-token "
                        f"windows, trained {before['created'][:10]}")
    metrics["previous"] = result
    metrics.setdefault("parses", parse_share(model, data, bos))
    (shipped_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return result
