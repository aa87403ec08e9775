"""``python -m kvlib.train``: train a model of ``kvlib.PRESETS`` on the standard library, or
rewrite the model card."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from .. import loading
from ..loading import TRAINED, TRAINED_DIR
from ..models import PRESETS
from .ablate import DEFAULT_VARIANTS, ablate, table_text
from .card import record_rerun, write_card
from .config import CLI_SETTINGS, TrainConfig
from .data import build_data
from .loop import Trainer
from .results import LONG_FILE, METRICS_FILE, finish, record_comparison, save_long_text


def train(cfg: TrainConfig, resume: bool = False, stop_at: int | None = None,
          command: str | None = None, card: bool = True) -> dict:
    """Build the data, train (or resume) the run ``cfg`` describes, up to step ``stop_at`` if
    given, write the weights, metrics and loss curve into ``cfg.out_dir`` and, with ``card``, the
    model card beside them."""
    data = build_data(cfg.arch.vocab_size, cfg.corpus_root)
    trainer = Trainer.resume(cfg, data) if resume else Trainer(cfg, data)
    trainer.run(stop_at)
    metrics = finish(trainer, command)
    if card:
        write_card(cfg.out_dir.parent)
    return metrics


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvlib.train", description=__doc__)
    d = TrainConfig.__dataclass_fields__
    p.add_argument("--model", default=d["model"].default, help="mini-gpt2 or mini-llama (or "
                   "another preset)")
    p.add_argument("--steps", type=int, help="optimizer steps: the reproducible knob")
    p.add_argument("--minutes", type=float, help="wall-clock budget; alone, it sets --steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    p.add_argument("--stop-at", type=int, help="stop at this step (the schedule still ends at "
                   "--steps): --resume continues it")
    for name in CLI_SETTINGS:
        default = d[name].default
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"default {default}")
    p.add_argument("--init-from", metavar="FOLDER", help="start from the weights of an earlier "
                   "run's output folder (a second phase: a new optimizer and schedule)")
    p.add_argument("--out", help="where the weights go (default kvlib/trained/<model>/)")
    p.add_argument("--checkpoint-dir", help="default checkpoints/<model>/")
    p.add_argument("--corpus-root", help="the stdlib folder to read (default: this Python's)")
    p.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="change a field of the model's config, e.g. --set n_layers=2")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--bos", action="store_true", help="open every training window with "
                   "<|endoftext|> (default: windows cut at random places)")
    p.add_argument("--no-autocast", action="store_true", help="train in float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-card", action="store_true", help="do not rewrite the model card")
    p.add_argument("--card", action="store_true", help="only rewrite kvlib/trained/README.md "
                   "from the metrics files, then stop")
    p.add_argument("--record-rerun", metavar="FOLDER", help="compare the rerun written to "
                   "FOLDER (--out) with the shipped model, record it in its metrics, rewrite the "
                   "card, then stop")
    p.add_argument("--ablate", nargs="*", metavar="VARIANT", help="train these variants of the "
                   "run (default: cut bos; +recall mixes in passkey episodes at --recall-share) "
                   "into --out (default checkpoints/ablations/<model>/), measure them, write "
                   "ablation.md and ablation.json there, then stop")
    p.add_argument("--compare-with", metavar="FOLDER", help="measure the shipped --model "
                   "against the model in FOLDER (the weights it replaced, e.g. checked out of git "
                   "into a folder): perplexity on FOLDER's test slice and the share of function "
                   "headers whose continuation parses; record it in the shipped metrics, "
                   "rewrite the card, then stop")
    p.add_argument("--long-text", action="store_true", help=f"only write {LONG_FILE} (the "
                   "long held-out text) beside the trained models, then stop")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    args = parser().parse_args(argv)
    if args.card:
        print(f"wrote {write_card()}")
        return None
    if args.record_rerun:
        r = record_rerun(args.record_rerun)
        print(f"rerun: perplexity {r['perplexity']:.3f}, same weights: {r['same_weights']}")
        return None
    if args.compare_with:
        shipped = json.loads((loading.TRAINED_DIR / args.model / METRICS_FILE).read_text())
        data = build_data(shipped["config"]["vocab_size"], args.corpus_root)
        r = record_comparison(args.model, args.compare_with, data)
        write_card()
        print(f"{args.model}: perplexity {r['perplexity']:.3f} against "
              f"{r['previous_perplexity']:.3f} before, on {r['windows']} windows")
        return None
    if args.long_text:
        for name in TRAINED:
            folder = TRAINED_DIR / name
            if folder.is_dir():
                metrics = folder / METRICS_FILE
                bos = metrics.is_file() and json.loads(metrics.read_text())["train"].get("bos")
                save_long_text(build_data(PRESETS[name].vocab_size, args.corpus_root), folder,
                               bool(bos))
                print(f"wrote {folder / LONG_FILE}")
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        model=args.model, steps=args.steps, minutes=args.minutes,
        **{name: getattr(args, name) for name in CLI_SETTINGS},
        model_overrides=dict(args.set), corpus_root=args.corpus_root, out=args.out,
        checkpoint_dir=args.checkpoint_dir, autocast=not args.no_autocast,
        progress=not args.no_progress, bos=args.bos, init_from=args.init_from)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "kvlib.train", *argv])
    if args.ablate is not None:
        rows = ablate(cfg, args.ablate or DEFAULT_VARIANTS, args.out, args.resume, command)
        print(table_text(rows))
        return None
    m = train(cfg, args.resume, args.stop_at, command, card=not args.no_card)
    print(f"{m['model']}: {m['steps']} steps in {m['seconds'] / 60:.1f} min "
          f"({m['tokens_per_s']:,.0f} tokens/s), held-out perplexity {m['test']['perplexity']:.3f}"
          f" (whole test split {m['test_full']['perplexity']:.3f}); wrote {cfg.out_dir}\n"
          f"the same weights again: {m['reproduce']}")
    return m
