"""The benchmark's figures (small PNGs): step latency over a long run, decode tokens/s by
strategy, and a step with and without a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..style import COLORS, NO_CACHE, strategy_color, strategy_label
from .plan import PROMPT

PLOTS = [("step_latency.png", "Decode step latency over a long generation"),
         ("tokens_per_s.png", "Decode tokens/s by strategy"),
         ("no_cache.png", "Per-step cost with and without a cache")]
GROUP = ("model", "dtype", "device", "batch")  # what one model's numbers share


def plot(data: dict, out_dir: str | Path) -> list[Path]:
    """Small PNGs: step latency curves, tokens/s bars, no cache vs cache per step."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_save(step_latency_figure(data), out_dir / PLOTS[0][0]),
               _save(tokens_per_s_figure(data["results"]), out_dir / PLOTS[1][0])]
    if data["no_cache"]:
        written.append(_save(no_cache_figure(data["no_cache"]), out_dir / PLOTS[2][0]))
    return written


def _running_median(y: np.ndarray, half: int = 4) -> np.ndarray:
    """A running median of ``2 * half + 1`` steps: keeps the trend, drops single spikes."""
    return np.array([np.median(y[max(0, i - half): i + half + 1]) for i in range(y.size)])


def floor_points(data: dict, key: dict) -> dict[int, float]:
    """The floor (no KV) and floor + KV of ``key``'s run at the lengths measured, by length."""
    pts = {max(f["kv_len"], len(PROMPT) + 1): f["ms"]["median"] for f in data["floor"]
           if all(f[k] == key[k] for k in (*GROUP, "new_tokens"))}
    pts.update({x["length"]: x["floor_kv_ms"] for x in data["no_cache"]
                if all(x[k] == key[k] for k in GROUP) and x["length"] <= max(pts, default=0)})
    return pts


def step_latency_figure(data: dict):
    """Step latency over the longest run of the first non-tiny model, with the floor dashed."""
    import matplotlib.pyplot as plt

    res = data["results"]
    longest = max(res, key=lambda r: (r["model"] != "tiny", r["batch"] == 1, r["new_tokens"]))
    key = {k: longest[k] for k in (*GROUP, "new_tokens")}
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    for r in (r for r in res if all(r[k] == v for k, v in key.items())):
        y = np.asarray(r["step_curve_ms"])
        if y.size > 20:
            y = _running_median(y)
        x = np.arange(y.size) + r["prompt_len"] + 1
        ax.plot(x, y, lw=1.2, label=strategy_label(r["strategy"], r.get("window")),
                color=strategy_color(r["strategy"]))
    pts = floor_points(data, key)
    if pts:
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "--", color=COLORS["floor"], lw=1, marker=".",
                label="floor (+ KV read)")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"{key['model']}, {key['dtype']}, {key['device']}, batch {key['batch']}",
                 fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def tokens_per_s_figure(res: list[dict]):
    """Decode tokens/s per group with min-max bars."""
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in res:
        groups.setdefault((r["model"], r["dtype"], r["batch"], r["new_tokens"]), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(2.4 * len(groups) + 0.6, 3.2), dpi=90,
                             squeeze=False)
    for ax, ((m, d, b, n), rows) in zip(axes[0], groups.items(), strict=True):
        tps = [r["decode_tokens_per_s"] for r in rows]
        err = [[t["median"] - t["min"] for t in tps], [t["max"] - t["median"] for t in tps]]
        ax.bar(range(len(rows)), [t["median"] for t in tps], yerr=err, capsize=2,
               color=[strategy_color(r["strategy"]) for r in rows])
        ax.set_xticks(range(len(rows)), [strategy_label(r["strategy"], r.get("window"))
                                         for r in rows],
                      rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{m} {d}\nB={b}, {n} tokens", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_ylabel("decode tokens/s")
    fig.tight_layout()
    return fig


def no_cache_figure(points: list[dict]):
    """A step without a cache (a forward over L tokens), with prealloc, and the floor + KV."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=90)
    for m in sorted({x["model"] for x in points}):
        xs = [x for x in points if x["model"] == m and x["batch"] == 1]
        if not xs:
            continue
        lengths = [x["length"] for x in xs]
        ax.plot(lengths, [x["no_cache_ms"]["median"] for x in xs], "o-",
                color=strategy_color("none"), label=f"{m}: {NO_CACHE} (forward over L)")
        cached = [(x["length"], x["cached_ms"]) for x in xs if x["cached_ms"]]
        if cached:
            ax.plot(*zip(*cached, strict=True), "s-", color=strategy_color("prealloc"),
                    label=f"{m}: {strategy_label('prealloc')} step")
        ax.plot(lengths, [x["floor_kv_ms"] for x in xs], "--", color=COLORS["floor"], lw=1,
                label=f"{m}: floor + KV")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("one step (ms, log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path
