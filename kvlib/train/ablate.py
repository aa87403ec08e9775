"""Short ablations before a full run: the same run (same seed, a few hundred steps) with its
windows cut at random places and with a start token, measured where the chapters need them.

    python -m kvlib.train --ablate --model mini-llama --steps 250              # cut, bos
    python -m kvlib.train --ablate cut bos bos+recall --recall-share 0.1 --model mini-llama ...

A variant is ``cut`` (windows cut at random places) or ``bos`` (every window opens with
``<|endoftext|>``), ``+recall`` to mix in passkey episodes at ``--recall-share``. Each trains into
``<folder>/<variant>/`` (weights, metrics, its checkpoint: ``--resume`` continues it), then is
measured on held-out text, each model as it was trained (with or without the start token):

- per layer, the attention weight that queries past the first four put on position 0;
- perplexity past the first eviction: windows of the context's length, the predictions after
  position ``W = context / 4``, with full attention, a sliding window of ``W`` and ``W`` slots
  that keep the first 4 tokens (``"sinks"`` for RoPE models; ``"evict"`` with no heavy hitters
  for GPT-2, whose learned positions the sink cache cannot move);
- passkey recall at distance ``context / 2``: full attention, and a sliding window of
  ``context / 4``, which cannot hold the binding (so: chance).

``<folder>/ablation.md`` and ``ablation.json`` tabulate every variant measured in the folder.
Variants can train in parallel, one process each (``--threads 1``); then ``--ablate ...
--resume`` keeps every variant already measured at the end of the same run and only rewrites the
table.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..caches import N_SINK
from ..evaluate import first_token_attention, perplexity
from ..loading import load_model
from ..models import CausalLM
from ..passkey import MAX_VALUE_TOKENS, passkeys_for, recall
from .config import TrainConfig
from .data import TokenData, build_data, fixed_windows
from .loop import Trainer
from .results import finish

RESULT_FILE = "ablation.json"
MEASURE_WINDOWS = 8  # held-out windows of the context's length for the perplexities
RECALL_EPISODES = 32
DEFAULT_VARIANTS = ("cut", "bos")


def variant_config(base: TrainConfig, name: str, folder: Path) -> TrainConfig:
    """``base`` as variant ``name`` (``cut`` or ``bos``, ``+recall``), writing into
    ``folder/name``."""
    words = name.split("+")
    if sorted(set(words) & {"cut", "bos"}) not in (["cut"], ["bos"]) or len(set(words)) != len(
            words) or set(words) - {"cut", "bos", "recall"}:
        raise ValueError(f"unknown variant {name!r}: say cut or bos, optionally +recall "
                         "(e.g. cut, bos, bos+recall)")
    if "recall" in words and not base.recall_share:
        raise ValueError(f"variant {name!r} mixes in passkey episodes: give their share with "
                         "--recall-share (e.g. 0.1)")
    return replace(base, bos="bos" in words,
                   recall_share=base.recall_share if "recall" in words else 0.0,
                   out=str(folder / name), checkpoint_dir=str(folder / name / "checkpoint"))


def ablate(base: TrainConfig, variants: list[str] | tuple[str, ...] = DEFAULT_VARIANTS,
           folder: str | Path | None = None, resume: bool = False,
           command: str | None = None) -> list[dict]:
    """Train every variant of ``base`` (with ``resume``: continuing those with a checkpoint and
    keeping those measured at the end of the same run), measure it, write
    ``folder/<variant>/ablation.json`` and the table; every row of it."""
    folder = Path(folder) if folder is not None else Path("checkpoints/ablations") / base.model
    configs = [variant_config(base, v, folder) for v in variants]  # errors before any training
    if resume:
        configs = [c for c in configs if not _measured(c)]
    data = build_data(base.arch.vocab_size, base.corpus_root) if configs else None
    for cfg in configs:
        name = Path(cfg.out).name
        again = resume and cfg.checkpoint_path.is_file()
        trainer = (Trainer.resume(cfg, data) if again else Trainer(cfg, data)).run()
        metrics = finish(trainer, command)
        row = {"variant": name, "steps": trainer.step, "valid_loss": metrics["valid_loss"],
               "test_perplexity": metrics["test"]["perplexity"], "train": cfg.to_dict(),
               **measure(load_model(cfg.out_dir), data, cfg.bos)}
        (cfg.out_dir / RESULT_FILE).write_text(json.dumps(row, indent=1) + "\n")
    return write_table(folder)


def _measured(cfg: TrainConfig) -> bool:
    """Whether ``cfg``'s variant was measured at the end of its schedule, with these settings."""
    path = cfg.out_dir / RESULT_FILE
    if not path.is_file():
        return False
    row = json.loads(path.read_text())
    return not TrainConfig.from_dict(row["train"]).differences(cfg) and row["steps"] == cfg.steps


def measure(model: CausalLM, data: TokenData, bos: bool) -> dict:
    """The ablation's numbers for one trained model (see the module docstring)."""
    ctx = model.cfg.context_length
    bos_id = data.tokenizer.eot_id if bos else None
    rows = fixed_windows(data.ids["test"], MEASURE_WINDOWS, ctx, bos_id)
    W = ctx // 4
    sinks = ({"cache": "evict", "budget": W, "n_sink": N_SINK, "window": W - N_SINK}
             if model.hard_context else {"cache": "sinks", "n_sink": N_SINK, "window": W - N_SINK})

    def past_eviction(**options) -> float:
        nll = perplexity(model, rows, **options).nll.view(rows.shape[0], -1)[:, W:]
        return float(nll.mean().exp())

    mass = first_token_attention(model, rows)
    out = {"context": ctx, "window": W, "n_sink": N_SINK, "sinks_cache": sinks["cache"],
           "first_token_attention": mass.tolist(),
           "first_token_attention_per_layer": mass.mean(dim=1).tolist(),
           "perplexity_full": past_eviction(), "perplexity_sliding": past_eviction(
               cache="sliding", window=W), "perplexity_sinks": past_eviction(**sinks)}
    keys = passkeys_for(data.tokenizer)
    prefix = min(16, ctx // 8)
    d = min(ctx // 2, ctx - bos - prefix - keys.max_head - MAX_VALUE_TOKENS - 1)
    out["recall_distance"] = d if d >= keys.min_distance else None
    if out["recall_distance"] is not None:
        opts = {"distance": d, "n": RECALL_EPISODES, "prefix": prefix, "bos": bos,
                "filler": data.ids["test"]}
        full, slid = recall(model, **opts), recall(model, cache="sliding", window=W, **opts)
        out.update(recall_full=full.accuracy, recall_full_tokens=full.token_accuracy,
                   recall_without_binding=full.without_binding, recall_sliding=slid.accuracy,
                   recall_chance=full.chance)
    return out


def write_table(folder: str | Path) -> list[dict]:
    """``ablation.json`` and ``ablation.md`` in ``folder`` from its variants' results."""
    folder = Path(folder)
    rows = [json.loads(p.read_text()) for p in folder.glob(f"*/{RESULT_FILE}")]
    order = {v: i for i, v in enumerate(DEFAULT_VARIANTS)}
    rows.sort(key=lambda r: (order.get(r["variant"], len(order)), r["variant"]))
    (folder / RESULT_FILE).write_text(json.dumps(rows, indent=1) + "\n")
    (folder / "ablation.md").write_text(table_text(rows))
    return rows


def table_text(rows: list[dict]) -> str:
    lines = ["| variant | steps | valid loss | held-out perplexity | attention on position 0, "
             "per layer | perplexity past W: full / sliding / sinks | recall: full (unbound) / "
             "sliding |", "|" + "---|" * 7]
    for r in rows:
        layers = " ".join(f"{m:.2f}" for m in r["first_token_attention_per_layer"])
        recall_cell = "n/a (the context is too short)"
        if r.get("recall_distance") is not None:
            recall_cell = (f"{r['recall_full']:.0%} ({r['recall_without_binding']:.0%}) / "
                           f"{r['recall_sliding']:.0%} at distance {r['recall_distance']}")
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['valid_loss']:.3f} | "
            f"{r['test_perplexity']:.2f} | {layers} | {r['perplexity_full']:.2f} / "
            f"{r['perplexity_sliding']:.2f} / {r['perplexity_sinks']:.2f} | {recall_cell} |")
    if rows:
        r = rows[0]
        lines.append(f"\nContext {r['context']} tokens, W = {r['window']}; sinks: "
                     f"{r['n_sink']} first tokens and {r['window'] - r['n_sink']} recent ones "
                     f"(`{r['sinks_cache']}` cache); chance at recall: "
                     f"{r.get('recall_chance', 0):.1e}. Each model is measured as it was trained "
                     "(the bos variants' windows open with <|endoftext|>).")
    return "\n".join(lines) + "\n"
