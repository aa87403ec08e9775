"""One benchmark run: every group of cells timed interleaved against the floor, then the extras
(steps with no cache at fixed lengths, per-step overhead), gathered into one JSON-ready dict."""

from __future__ import annotations

import datetime
import sys
from dataclasses import asdict

import numpy as np
import torch

from ..generate import decode_one
from ..loading import load_model
from ..machine import environment_info, load_average
from ..measure.floor import Floor, floor_nbytes
from ..measure.stats import NAN, median_ms, percentiles, summary
from ..models import CausalLM, GPTModel
from ..timing import Stopwatch, tokens_per_s
from .overhead import floor_gap, narrow_twin, twin_step_ms
from .plan import DTYPES, PROMPT, SCHEMA, Cell, Suite, check_cell
from .profiling import alloc_steps, count_allocations, profile_decode_step
from .runners import HFRunner, KvlibRunner, hf_twin, time_run
from .targets import targets


class Bench:
    """Runs suites and collects one JSON-ready dict."""

    def __init__(self, suites: list[Suite], *, warmup: int = 1, window: int = 128,
                 floor_samples: int = 20, no_cache_lengths: tuple[int, ...] = (64, 256, 512, 1000),
                 no_cache_repeats: int = 3, overhead: bool = False, overhead_tokens: int = 100,
                 progress: bool = True, command: str = "") -> None:
        self.suites, self.warmup, self.window = suites, warmup, window
        self.floor_samples, self.no_cache_lengths = floor_samples, no_cache_lengths
        self.no_cache_repeats, self.overhead, self.progress = no_cache_repeats, overhead, progress
        self.overhead_tokens = overhead_tokens
        self.command = command
        self._models: dict[tuple[str, str, str], CausalLM] = {}
        self._hf: dict[tuple[str, str, str], object] = {}

    def model(self, name: str, dtype: str, device: str) -> CausalLM:
        key = (name, dtype, device)
        if key not in self._models:
            self._models[key] = load_model(name, seed=123, dtype=DTYPES[dtype], device=device)
        return self._models[key]

    def hf(self, name: str, dtype: str, device: str):
        key = (name, dtype, device)
        if key not in self._hf:
            self._hf[key] = hf_twin(self.model(name, dtype, device))
        return self._hf[key]

    def groups(self) -> list[tuple[Suite, list[Cell]]]:
        """Cells that are timed together (interleaved): one per model/dtype/device/batch/N."""
        return [(s, cells) for s in self.suites for cells in s.groups()]

    def runner(self, cell: Cell):
        if cell.backend == "hf":
            return HFRunner(self.hf(cell.model, cell.dtype, cell.device), cell.strategy)
        return KvlibRunner(self.model(cell.model, cell.dtype, cell.device), cell.strategy,
                           self.window)

    def run(self) -> dict:
        from tqdm.auto import tqdm

        groups = self.groups()
        for _, cells in groups:
            for cell in cells:
                check_cell(cell)
        total = sum(len(cells) * (self.warmup + s.repeats) for s, cells in groups)
        out = {"schema": SCHEMA, "command": self.command,
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "environment": environment_info(groups[0][1][0].device if groups else "cpu")}
        results, floors = [], []
        with Stopwatch() as clock:
            with tqdm(total=total, desc="bench", unit="run", disable=not self.progress,
                      file=sys.stderr) as bar:
                for suite, cells in groups:
                    group_results, group_floors = self.run_group(suite, cells, bar)
                    results += group_results
                    floors += group_floors
            out.update(self.extras(results, floors))
        out["duration_s"] = clock.seconds
        out["targets"] = targets(out)
        return out

    def extras(self, results: list[dict], floors: list[dict]) -> dict:
        """Everything after the timed groups, in the JSON's order."""
        return {"load_avg_end": load_average(),
                "settings": {"prompt": PROMPT, "window": self.window, "warmup": self.warmup,
                             "floor_samples": self.floor_samples,
                             "suites": [asdict(s) for s in self.suites]},
                "results": results, "floor": floors, "no_cache": self.no_cache_section(results),
                "overhead": self.overhead_section(results) if self.overhead else None}

    def run_group(self, suite: Suite, cells: list[Cell], bar) -> tuple[list, list]:
        """Warm-up (with the allocation count), then the timed repeats, interleaved and rotated
        so each strategy sees every position, with floor samples between the repeats."""
        first = cells[0]
        model = self.model(first.model, first.dtype, first.device)
        idx = torch.tensor([PROMPT] * first.batch, device=first.device)  # (B, 6)
        runners = {c.strategy: self.runner(c) for c in cells}
        end = min(len(PROMPT) + first.new_tokens, model.cfg.context_length)  # tokens at the end
        floor_no_kv = Floor(model, first.batch)
        floor_kv_end = Floor(model, first.batch, kv_len=end)
        alloc = self.warm_up(cells, runners, idx, bar)
        floor_no_kv.warm_up()
        floor_kv_end.warm_up()
        runs: dict[str, list[dict]] = {c.strategy: [] for c in cells}
        floor_steps = max(1, self.floor_samples // suite.repeats)
        for r in range(suite.repeats):
            for c in cells[r % len(cells):] + cells[: r % len(cells)]:
                bar.set_description(f"{c.model} {c.strategy} N={c.new_tokens} B={c.batch} "
                                    f"rep {r + 1}")
                run = time_run(runners[c.strategy], idx, c.new_tokens)
                run["cache_nbytes"] = runners[c.strategy].cache_nbytes()
                runs[c.strategy].append(run)
                bar.update(1)
            floor_no_kv.measure(floor_steps)
            floor_kv_end.measure(floor_steps)
        floors = [self.floor_record(first, model, floor_no_kv),
                  self.floor_record(first, model, floor_kv_end)]
        ref = next((s for s in ("prealloc", "concat", "none") if s in runs), None)
        results = [self.result_record(c, runs[c.strategy], runs.get(ref), ref, floor_no_kv,
                                      floor_kv_end, alloc.get(c.strategy)) for c in cells]
        return results, floors

    def warm_up(self, cells: list[Cell], runners: dict, idx: torch.Tensor, bar) -> dict:
        """Untimed runs of at most 64 tokens; the first of each strategy counts allocations at
        two lengths. Returns the counts by strategy."""
        alloc = {}
        n_warm = min(cells[0].new_tokens, 64)
        at = alloc_steps(n_warm)
        for c in cells:
            bar.set_description(f"{c.model} {c.strategy} N={c.new_tokens} B={c.batch} warm-up")
            for w in range(self.warmup):
                if w == 0 and at:
                    alloc[c.strategy] = count_allocations(runners[c.strategy], idx, at)
                else:
                    time_run(runners[c.strategy], idx, n_warm)
                bar.update(1)
        return alloc

    def floor_record(self, c: Cell, model: CausalLM, floor: Floor) -> dict:
        return {"model": c.model, "dtype": c.dtype, "device": c.device, "batch": c.batch,
                "new_tokens": c.new_tokens, "kv_len": floor.kv_len,
                "weight_nbytes": floor_nbytes(model), "kv_nbytes": floor.kv_nbytes,
                "ms": summary([1e3 * t for t in floor.times])}

    def result_record(self, c: Cell, runs: list[dict], ref_runs: list[dict] | None,
                      ref: str | None, floor_no_kv: Floor, floor_kv_end: Floor,
                      alloc: list[dict] | None) -> dict:
        steps = np.array([r["steps"] for r in runs]) * 1e3  # (repeats, steps) in ms
        is_ref = c.strategy == ref
        return {
            **asdict(c), "backend": c.backend, "repeats": len(runs), "prompt_len": len(PROMPT),
            "window": self.window if c.strategy == "sliding" else None,
            "prefill_ms": summary([1e3 * r["prefill"] for r in runs]),
            "decode_tokens_per_s": summary([c.batch * tokens_per_s(r["steps"]) for r in runs
                                            if r["steps"]]),
            "e2e_tokens_per_s": summary([c.batch * (len(r["steps"]) + 1) / r["wall"]
                                         for r in runs]),
            "wall_s": summary([r["wall"] for r in runs]),
            **step_stats(steps, median_ms(floor_no_kv.times), median_ms(floor_kv_end.times)),
            "cache_nbytes": runs[-1]["cache_nbytes"],
            "allocations": alloc,
            "tokens": runs[0]["tokens"][0].tolist(),  # the first sequence's new tokens
            "tokens_ref": None if is_ref else ref,
            **token_match(runs, None if is_ref else ref_runs),
        }

    def no_cache_section(self, results: list[dict]) -> list[dict]:
        """Per-step cost without a cache, measured directly: one forward pass over a sequence
        (logits for the last position only, exactly what ``decode_one`` does without a cache),
        next to the cached step at the same length and the floor + KV at that length."""
        keys = sorted({(r["model"], r["dtype"], r["device"], r["batch"]) for r in results
                       if r["strategy"] == "none"})
        return [self.no_cache_point(results, *key, length) for key in keys
                for length in self.no_cache_lengths
                if length <= self.model(*key[:3]).cfg.context_length]

    def no_cache_point(self, results: list[dict], name: str, dtype: str, device: str,
                       batch: int, length: int) -> dict:
        model = self.model(name, dtype, device)
        floor = Floor(model, batch, kv_len=length)
        model.set_kv_cache("none")
        seq = torch.randint(0, model.cfg.vocab_size, (batch, length), device=device)
        times = []
        with torch.inference_mode():
            decode_one(model, seq)  # warm-up
            for _ in range(self.no_cache_repeats):
                with Stopwatch(device) as sw:
                    decode_one(model, seq)
                times.append(sw.seconds)
        floor.warm_up()
        floor.measure(10)
        cached = cached_step_at(results, name, dtype, device, batch, length)
        no_cache_ms = median_ms(times)
        return {"model": name, "dtype": dtype, "device": device, "batch": batch,
                "length": length, "no_cache_ms": summary([1e3 * t for t in times]),
                "cached_ms": cached, "floor_kv_ms": median_ms(floor.times),
                "speedup": no_cache_ms / cached if cached else None}

    def overhead_section(self, results: list[dict]) -> dict:
        """Per-step Python and dispatch overhead: the decode step of a twin of the first non-tiny
        model with the same layers and heads but 4-wide heads and a 256-token vocabulary, where
        arithmetic costs next to nothing; plus torch.profiler's view of one real decode step, and
        where the real step's time above the floor goes."""
        big = next((r for r in results if r["model"] != "tiny"), results[0])
        name, dtype, device = big["model"], big["dtype"], big["device"]
        model = self.model(name, dtype, device)
        gpt2 = isinstance(model, GPTModel)  # the twin and the bare step are GPT-2's
        twin = narrow_twin(name, dtype, device) if gpt2 else None
        same = [r for r in results if (r["model"], r["dtype"], r["device"], r["batch"])
                == (name, dtype, device, 1)]
        n = min((r["new_tokens"] for r in same), default=None)  # the shortest run's steps
        return {"model": name,
                "twin": {"emb_dim": twin.cfg.emb_dim, "vocab_size": 256} if twin else None,
                "twin_step_ms": twin_step_ms(twin, self.window, self.overhead_tokens)
                if twin else {},
                "real_step_ms": {r["strategy"]: r["step_ms"]["p50"] for r in same
                                 if r["new_tokens"] == n},
                "real_new_tokens": n, "profile": profile_decode_step(model),
                "gap": floor_gap(model) if gpt2 else None}


def step_stats(steps: np.ndarray, floor_ms: float, floor_end_ms: float) -> dict:
    """What the decode steps ``(repeats, steps)`` in ms say: percentiles, the median of the first
    and last ``flat_window`` steps (up to 100), the last 20 steps, and both ratios to the floor."""
    n_steps = steps.shape[1]
    k = min(100, n_steps // 2) if n_steps >= 2 else 0
    curve = np.median(steps, axis=0) if n_steps else np.zeros(0)
    end_ms = float(np.median(steps[:, -20:])) if n_steps >= 20 else NAN
    step_med = float(np.median(steps)) if n_steps else NAN
    flat = steps.ravel().tolist()
    return {"step_ms": {**percentiles(flat), **summary(flat)},
            "first_ms": float(np.median(steps[:, :k])) if k else NAN,
            "last_ms": float(np.median(steps[:, -k:])) if k else NAN,
            "flat_window": k,
            "end_ms": end_ms,
            "floor_ratio": step_med / floor_ms,  # median step / floor (no KV)
            "end_floor_kv_ratio": end_ms / floor_end_ms,  # last 20 steps / floor + KV at the end
            "step_curve_ms": [round(float(x), 4) for x in curve]}


def token_match(runs: list[dict], ref_runs: list[dict] | None) -> dict:
    """Whether the first run's tokens equal the reference's, and the first position that
    differs (both None without a reference)."""
    if ref_runs is None:
        return {"tokens_match": None, "first_mismatch": None}
    diff = (runs[0]["tokens"] != ref_runs[0]["tokens"]).any(dim=0).nonzero()
    match = diff.numel() == 0
    return {"tokens_match": match, "first_mismatch": None if match else int(diff[0])}


def cached_step_at(results: list[dict], model: str, dtype: str, device: str, batch: int,
                   length: int) -> float | None:
    """Median prealloc decode step that attends over ``length`` keys, from the longest run."""
    runs = [r for r in results if (r["model"], r["dtype"], r["device"], r["batch"],
                                   r["strategy"]) == (model, dtype, device, batch, "prealloc")]
    if not runs:
        return None
    r = max(runs, key=lambda r: r["new_tokens"])
    i = length - r["prompt_len"] - 1  # step i (0-based in step_times) attends over P + i + 1 keys
    curve = r["step_curve_ms"]
    if not 0 <= i < len(curve):
        return None
    return float(np.median(curve[max(0, i - 5): i + 6]))
