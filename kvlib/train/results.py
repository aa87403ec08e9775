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

from ..evaluate import LONG_FILE, SLICE_FILE, SLICE_FORMAT, perplexity, windows_sha256
from ..generate import generate
from ..loading import load_model, save_model
from ..machine import environment_info
from ..models import CausalLM, GPTModel
from ..plots.figure import figure_png
from ..plots.training import plot_training
from .data import TokenData, fixed_windows
from .loop import Trainer

METRICS_FILE, LOSS_FILE = "metrics.json", "loss.png"
LONG_TOKENS = 4096  # 16x the mini models' context
PROMPTS = ("def fibonacci(n):\n", 'class Stack:\n    """', "import os\nimport sys\n\n\ndef main(")
SAMPLE_TOKENS = 60


def save_test_slice(windows: torch.Tensor, path: Path, source: str = "") -> None:
    """The held-out windows as token ids (one window per line); ``source`` says where from."""
    rows = ",\n".join(json.dumps(w) for w in windows.tolist())
    path.write_text(f'{{"format": "{SLICE_FORMAT}", "sha256": "{windows_sha256(windows)}", '
                    f'"source": {json.dumps(source)}, "windows": [\n{rows}\n]}}\n')


def long_text(data: TokenData, tokens: int = LONG_TOKENS) -> tuple[torch.Tensor, str]:
    """The first ``tokens`` tokens of the longest file of the test split (``(1, tokens)``, fewer
    if that file is shorter), and its name: one file, so that a name defined early and used late
    is really the same name."""
    ids, eot = data.ids["test"], data.tokenizer.eot_id
    ends = np.flatnonzero(ids == eot)
    starts = np.r_[0, ends[:-1] + 1]
    longest = int(np.argmax(ends - starts))
    start = int(starts[longest])
    end = min(start + tokens, int(ends[longest]))
    window = torch.from_numpy(ids[start:end].astype(np.int64))[None]
    return window, data.manifest.get("test_files", [None] * len(ends))[longest] or ""


def save_long_text(data: TokenData, out: Path) -> None:
    """Write ``test_long.json`` into ``out`` (``python -m kvlib.train --long-text`` does it for
    models trained before it existed)."""
    window, name = long_text(data)
    save_test_slice(window, out / LONG_FILE, f"the first {window.shape[1]} tokens of {name}")


def score(model: CausalLM, windows: torch.Tensor) -> dict:
    result = perplexity(model, windows, batch_size=16)
    return {"windows": windows.shape[0], "window_tokens": windows.shape[1],
            "tokens_scored": result.tokens, "mean_nll": result.mean_nll,
            "perplexity": result.perplexity, "sha256": windows_sha256(windows)}


def samples(model: CausalLM) -> list[dict]:
    """Greedy continuations of a few prompts (the prealloc cache), within the context."""
    tok = model.tokenizer
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        n = min(SAMPLE_TOKENS, model.cfg.context_length - ids.shape[1])
        tokens = generate(model, ids, n, cache="prealloc").tokens[0, ids.shape[1]:]
        out.append({"prompt": prompt, "completion": tok.decode(tokens.tolist())})
    return out


def finish(trainer: Trainer, command: str | None = None) -> dict:
    """Write the weights, score them, write ``metrics.json`` and ``loss.png``; the metrics."""
    cfg, data = trainer.cfg, trainer.data
    out = cfg.out_dir
    ctx = cfg.arch.context_length
    save_model(trainer.model, out)  # bfloat16 safetensors, config.json, vocab.json
    windows = fixed_windows(data.ids["test"], cfg.test_windows, ctx)
    save_test_slice(windows, out / SLICE_FILE)
    save_long_text(data, out)
    shipped = load_model(out)  # float32, as a reader gets it
    test_ids = data.ids["test"]
    whole = torch.from_numpy(test_ids[: len(test_ids) // ctx * ctx].astype(np.int64))
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
        "test": score(shipped, windows), "test_full": score(shipped, whole.view(-1, ctx)),
        "corpus": data.manifest, "vocab_size": data.tokenizer.vocab_size,
        "samples": samples(shipped), "sample_tokens": SAMPLE_TOKENS,
        "reproduce": cfg.command(trainer.total_steps, None if trainer.step == trainer.total_steps
                                 else trainer.step) + f" --threads {torch.get_num_threads()}",
        "command": command or " ".join(["python -m kvlib.train", *sys.argv[1:]]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_info(),
        "history": {k: [round(v, 5) if isinstance(v, float) else v for v in vals]
                    for k, vals in trainer.history.items()},
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    (out / LOSS_FILE).write_bytes(figure_png(plot_training(metrics), dpi=100))
    return metrics
