"""Benchmarks: every cache strategy, measured against the weight-streaming floor and Hugging Face.

    python -m kvlib.bench run --models gpt2 --new-tokens 200 --compare hf --out results.json
    python -m kvlib.bench run --plan full --out benchmarks/results.json --plots benchmarks
    python -m kvlib.bench report benchmarks/results.json > benchmarks/RESULTS.md
    python -m kvlib.bench plot benchmarks/results.json --dir benchmarks

What one run measures, for every model x dtype x device x batch x new-token count:

- each strategy (none, concat, prealloc, sliding) and, with ``--compare hf``, transformers'
  ``GPT2LMHeadModel`` with ``DynamicCache`` and ``StaticCache`` holding the same weights: a warm-up,
  then ``repeats`` runs, interleaved (strategy A, B, C, A, B, C, ...) so that a noisy neighbour
  slows every strategy alike. Prefill and decode are timed apart; per step we keep the latency.
- the floor: decoding one token must read every weight matrix once, so a bare chain of
  matrix-vector products over the model's own matrices (``F.linear`` on one token, tied head once)
  is as fast as a decode step can be; "floor + KV" adds one attention read of a cache of L tokens
  per layer. Each decode step is reported as a ratio to it.
- allocations per decode step (torch.profiler memory events), cache bytes held, and, for the
  no-cache baseline, one forward pass over the whole sequence timed directly at a few lengths.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import STRATEGIES
from .generate import decode_one, generate_stream
from .models import GPTConfig, GPTModel
from .timing import device_sync as _sync

SCHEMA = "kvlib-bench/1"
PROMPT = [464, 1994, 284, 3049, 5270, 318]  # "The key to fast generation is": 6 GPT-2 tokens
HF_KINDS = ("hf-dynamic", "hf-static")  # transformers' DynamicCache and StaticCache
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- plans

@dataclass
class Suite:
    """A grid of benchmark cells: every combination of the lists below."""

    models: list[str]
    strategies: list[str]
    new_tokens: list[int]
    batches: list[int] = field(default_factory=lambda: [1])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    repeats: int = 3
    compare_hf: bool = False  # also run transformers' DynamicCache and StaticCache


# "full" is the run behind benchmarks/RESULTS.md (about 17 minutes on 2 quiet cores). The gpt2
# rows behind the targets get more repeats (a shared machine drifts by ~10% within a minute); the
# no-cache baseline runs 200 tokens once, for the end-to-end speed-up; per step it is timed at fixed
# lengths.
PLANS: dict[str, list[Suite]] = {
    "full": [
        Suite(["gpt2"], ["concat", "prealloc", "sliding"], [200], repeats=5, compare_hf=True),
        Suite(["gpt2"], ["none"], [200], repeats=1),
        Suite(["gpt2"], ["concat", "prealloc", "sliding"], [1000], repeats=3, compare_hf=True),
        Suite(["tiny"], ["none", "concat", "prealloc", "sliding"], [200], repeats=3,
              compare_hf=True),
        Suite(["gpt2"], ["concat", "prealloc"], [200], batches=[4], repeats=1),
        Suite(["gpt2-medium"], ["concat", "prealloc", "sliding"], [100], repeats=1,
              compare_hf=True),
        Suite(["tiny", "gpt2"], ["prealloc"], [50], dtypes=["bfloat16"], repeats=1),
    ],
    "quick": [  # seconds: the tiny model only (what the tests run)
        Suite(["tiny"], ["none", "concat", "prealloc", "sliding"], [32], repeats=2,
              compare_hf=True),
    ],
}


# ----------------------------------------------------------------------------- statistics

def summary(xs: list[float]) -> dict[str, float]:
    """Median, quartiles, extremes and count of a sample."""
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"),
                "min": float("nan"), "max": float("nan"), "n": 0}
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(a.min()),
            "max": float(a.max()), "n": int(a.size)}


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99]) if a.size else (float("nan"),) * 3
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


# ----------------------------------------------------------------------------- environment

def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: str = "cpu") -> dict:
    """Everything a reader needs to compare our numbers with theirs."""
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    from . import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__, "python": platform.python_version(), "kvlib": __version__,
        "transformers": hf_version, "platform": platform.platform(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "gpu": gpu, "device": device,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------- the floor

def floor_weights(model: GPTModel) -> list[tuple[Tensor, Tensor | None]]:
    """Every matrix a decode step must read, in order: per block c_attn, c_proj, c_fc, c_proj
    (with their biases), then the output head, which is the token embedding (tied: read once)."""
    mats = []
    for block in model.h:
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            mats.append((lin.weight, lin.bias))
    mats.append((model.lm_head.weight, None))
    return mats


def floor_nbytes(model: GPTModel) -> int:
    """Bytes the floor reads: every tensor of ``floor_weights`` once."""
    seen = {}
    for w, b in floor_weights(model):
        for t in (w, b):
            if t is not None:
                seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def floor_step(mats: list[tuple[Tensor, Tensor | None]], x: Tensor,
               kv: list[tuple[Tensor, Tensor]] | None = None, n_heads: int = 1) -> Tensor:
    """A chain of matrix-vector products over ``mats`` starting from ``x`` ``(B, C)``: each
    output (cut to the next matrix's input width) feeds the next, so none can be skipped. With
    ``kv`` (per layer ``(B, H, L, D)`` keys and values), each layer's query also attends over its
    keys and values once: the floor of a decode step at sequence length L."""
    for j, (w, b) in enumerate(mats):
        x = F.linear(x[:, : w.shape[1]], w, b)  # (B, out)
        if kv is not None and j % 4 == 0 and j // 4 < len(kv):  # after a layer's c_attn
            k, v = kv[j // 4]
            B, C = x.shape[0], w.shape[1]
            q = x[:, :C].reshape(B, n_heads, 1, C // n_heads)  # (B, H, 1, D)
            x = F.scaled_dot_product_attention(q, k, v).reshape(B, C)  # reads K and V once
    return x


class Floor:
    """Times ``floor_step`` on a model's own weights, for a batch size and a KV length."""

    def __init__(self, model: GPTModel, batch: int, kv_len: int = 0) -> None:
        cfg, p = model.cfg, next(model.parameters())
        self.mats, self.n_heads, self.device = floor_weights(model), cfg.n_heads, p.device
        self.x = torch.randn(batch, cfg.emb_dim, dtype=p.dtype, device=p.device)
        shape = (batch, cfg.n_heads, kv_len, cfg.head_dim)
        self.kv = None if kv_len == 0 else [
            (torch.randn(shape, dtype=p.dtype, device=p.device),
             torch.randn(shape, dtype=p.dtype, device=p.device)) for _ in range(cfg.n_layers)]
        self.kv_len = kv_len
        self.kv_nbytes = 0 if self.kv is None else sum(
            k.numel() * k.element_size() * 2 for k, _ in self.kv)
        self.times: list[float] = []

    @torch.inference_mode()
    def measure(self, n: int) -> None:
        for _ in range(n):
            _sync(self.device)
            t0 = time.perf_counter()
            floor_step(self.mats, self.x, self.kv, self.n_heads)
            _sync(self.device)
            self.times.append(time.perf_counter() - t0)


# ----------------------------------------------------------------------------- runners

class KvlibRunner:
    """kvlib's own generation loop (``generate_stream``) with one cache strategy."""

    def __init__(self, model: GPTModel, strategy: str, window: int) -> None:
        self.model, self.strategy = model, strategy
        self.window = window if strategy == "sliding" else None

    def stream(self, idx: Tensor, n: int) -> Iterator[tuple[Tensor, float]]:
        cache = None if self.strategy == "none" else self.strategy
        for step in generate_stream(self.model, idx, n, cache=cache, window=self.window):
            yield step.tokens, step.seconds

    def cache_nbytes(self) -> int:
        return self.model.kv_cache_nbytes


class HFRunner:
    """transformers' GPT2LMHeadModel in the same loop shape: prefill, then one token per step,
    logits for the last position only, greedy; the timer covers forward and argmax, as kvlib's."""

    def __init__(self, hf, kind: str) -> None:
        import inspect

        self.hf, self.kind, self.cache = hf, kind, None
        # transformers 5 renamed past_key_values to cache
        params = inspect.signature(hf.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, batch: int, max_len: int):
        from transformers import DynamicCache, StaticCache

        if self.kind == "hf-dynamic":
            return DynamicCache(config=self.hf.config)
        try:
            return StaticCache(config=self.hf.config, max_cache_len=max_len)
        except TypeError:  # transformers 4.x also wants the batch size
            return StaticCache(config=self.hf.config, max_batch_size=batch,
                               max_cache_len=max_len)

    @torch.inference_mode()
    def stream(self, idx: Tensor, n: int) -> Iterator[tuple[Tensor, float]]:
        self.cache = self.new_cache(idx.shape[0], idx.shape[1] + n)
        nxt = idx
        for _ in range(n):
            _sync(idx.device)
            t0 = time.perf_counter()
            out = self.hf(input_ids=nxt, use_cache=True, logits_to_keep=1,
                          **{self.cache_kw: self.cache})
            nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
            _sync(idx.device)
            yield nxt[:, 0], time.perf_counter() - t0

    def cache_nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total


def hf_twin(model: GPTModel):
    """transformers' GPT2LMHeadModel holding exactly ``model``'s weights (same dtype and device)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise ImportError('--compare hf needs transformers: pip install "kvlib[compare]"') from e
    from .hf.gpt2 import hf_config, to_hf_state_dict

    p = next(model.parameters())
    config = hf_config(model.cfg)
    config._attn_implementation = "sdpa"  # the same attention kernel as kvlib
    config.bos_token_id = config.eos_token_id = min(50256, config.vocab_size - 1)  # small vocabs
    hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    if unexpected or any(not k.endswith(("attn.bias", "attn.masked_bias")) for k in missing):
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    return hf.to(device=p.device, dtype=p.dtype).eval()


def time_run(runner, idx: Tensor, n: int) -> dict:
    """One generation of ``n`` tokens: tokens, prefill seconds, decode step seconds, wall time."""
    tokens, times = [], []
    t0 = time.perf_counter()
    for tok, seconds in runner.stream(idx, n):
        tokens.append(tok)
        times.append(seconds)
    wall = time.perf_counter() - t0
    return {"tokens": torch.stack(tokens, dim=1).cpu(), "prefill": times[0], "steps": times[1:],
            "wall": wall}


def alloc_steps(n: int, k: int = 3) -> list[int]:
    """Where ``count_allocations`` looks in an ``n``-token run: ``k`` steps from near the middle
    and ``k`` steps at the end, apart (one window for a short run, none for a very short one)."""
    first, last = max(1, n // 2 - k), n - k - 1
    return [first, last] if last >= first + k else [first] if first + k <= n - 1 else []


def count_allocations(runner, idx: Tensor, at_steps: list[int], k: int = 3) -> list[dict]:
    """Allocations per decode step: torch.profiler records every allocator call ("[memory]"
    events with their sizes); we profile ``k`` consecutive decode steps starting at each step in
    ``at_steps`` (1 = the first decode step; the loop's own work between steps included) and
    divide by ``k``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if idx.is_cuda else [])
    out, done = [], 0  # items taken from the stream; item 0 is the prefill, item i step i
    stream = runner.stream(idx, max(at_steps) + k)
    for start in sorted(at_steps):
        for _ in range(start - done):
            next(stream)
        with profile(activities=activities, profile_memory=True) as prof:
            for _ in range(k):
                next(stream)
        done = start + k
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and e.nbytes() > 0]
        out.append({"step": start, "seq_len": idx.shape[1] + start,  # keys attended at start
                    "count": len(sizes) / k, "bytes": sum(sizes) / k})
    for _ in stream:  # finish the generation
        pass
    return out


# ----------------------------------------------------------------------------- one run

@dataclass
class Cell:
    model: str
    strategy: str  # none, concat, prealloc, sliding, hf-dynamic, hf-static
    new_tokens: int
    batch: int
    dtype: str
    device: str

    @property
    def backend(self) -> str:
        return "hf" if self.strategy.startswith("hf-") else "kvlib"


def load(preset: str, dtype: str, device: str, seed: int = 123) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig.from_preset(preset))
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--devices {device}: torch sees no CUDA GPU here; use --devices cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("--devices mps: MPS is not available here; use --devices cpu")


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
        self._models: dict[tuple[str, str, str], GPTModel] = {}
        self._hf: dict[tuple[str, str, str], object] = {}

    def model(self, name: str, dtype: str, device: str) -> GPTModel:
        key = (name, dtype, device)
        if key not in self._models:
            self._models[key] = load(name, dtype, device)
        return self._models[key]

    def hf(self, name: str, dtype: str, device: str):
        key = (name, dtype, device)
        if key not in self._hf:
            self._hf[key] = hf_twin(self.model(name, dtype, device))
        return self._hf[key]

    def groups(self) -> list[tuple[Suite, list[Cell]]]:
        """Cells that are timed together (interleaved): one per model/dtype/device/batch/N."""
        out = []
        for s in self.suites:
            for m, d, dev, b, n in itertools.product(s.models, s.dtypes, s.devices, s.batches,
                                                     s.new_tokens):
                strategies = list(s.strategies) + (list(HF_KINDS) if s.compare_hf else [])
                out.append((s, [Cell(m, st, n, b, d, dev) for st in strategies]))
        return out

    def runner(self, cell: Cell):
        if cell.backend == "hf":
            return HFRunner(self.hf(cell.model, cell.dtype, cell.device), cell.strategy)
        return KvlibRunner(self.model(cell.model, cell.dtype, cell.device), cell.strategy,
                           self.window)

    def run(self) -> dict:
        from tqdm.auto import tqdm

        groups = self.groups()
        for _, cells in groups:
            for c in cells:
                check_device(c.device)
                if c.strategy not in STRATEGIES and c.strategy not in HF_KINDS:
                    raise SystemExit(f"unknown strategy {c.strategy!r}; choose from "
                                     f"{list(STRATEGIES)} (HF caches come with --compare hf)")
                ctx = GPTConfig.from_preset(c.model).context_length
                if c.strategy != "none" and len(PROMPT) + c.new_tokens > ctx:
                    raise SystemExit(f"{c.model}: {len(PROMPT)} prompt + {c.new_tokens} new "
                                     f"tokens exceed its {ctx} positions; ask for fewer")
        total = sum(len(cells) * (self.warmup + s.repeats) for s, cells in groups)
        env_start = environment_info(groups[0][1][0].device if groups else "cpu")
        started = time.perf_counter()
        results, floors = [], []
        with tqdm(total=total, desc="bench", unit="run", disable=not self.progress,
                  file=sys.stderr) as bar:
            for suite, cells in groups:
                r, f = self.run_group(suite, cells, bar)
                results += r
                floors += f
        out = {
            "schema": SCHEMA, "command": self.command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": env_start,
            "load_avg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "settings": {"prompt": PROMPT, "window": self.window, "warmup": self.warmup,
                         "floor_samples": self.floor_samples,
                         "suites": [asdict(s) for s in self.suites]},
            "results": results, "floor": floors, "no_cache": self.no_cache_section(results),
        }
        out["overhead"] = self.overhead_section(results) if self.overhead else None
        out["duration_s"] = time.perf_counter() - started
        out["targets"] = targets(out)
        return out

    def run_group(self, suite: Suite, cells: list[Cell], bar) -> tuple[list, list]:
        c0 = cells[0]
        model = self.model(c0.model, c0.dtype, c0.device)
        idx = torch.tensor([PROMPT] * c0.batch, device=c0.device)  # (B, 6)
        n = c0.new_tokens
        runners = {c.strategy: self.runner(c) for c in cells}
        floor0 = Floor(model, c0.batch)
        floor_end = Floor(model, c0.batch, kv_len=min(len(PROMPT) + n,
                                                      model.cfg.context_length))
        # Warm-up runs (untimed, at most 64 tokens) also count allocations at two lengths.
        alloc = {}
        n_warm = min(n, 64)
        at = alloc_steps(n_warm)
        for c in cells:
            bar.set_description(f"{c.model} {c.strategy} N={n} B={c.batch} warm-up")
            for w in range(self.warmup):
                if w == 0 and at:
                    alloc[c.strategy] = count_allocations(runners[c.strategy], idx, at)
                else:
                    time_run(runners[c.strategy], idx, n_warm)
                bar.update(1)
        floor0.measure(3)
        floor_end.measure(3)
        floor0.times.clear()
        floor_end.times.clear()
        # Timed repeats, interleaved and rotated so each strategy sees every position.
        runs: dict[str, list[dict]] = {c.strategy: [] for c in cells}
        per = max(1, self.floor_samples // suite.repeats)
        for r in range(suite.repeats):
            order = cells[r % len(cells):] + cells[: r % len(cells)]
            for c in order:
                bar.set_description(f"{c.model} {c.strategy} N={n} B={c.batch} rep {r + 1}")
                run = time_run(runners[c.strategy], idx, n)
                run["cache_nbytes"] = runners[c.strategy].cache_nbytes()
                runs[c.strategy].append(run)
                bar.update(1)
            floor0.measure(per)
            floor_end.measure(per)
        floors = [self.floor_record(c0, model, floor0), self.floor_record(c0, model, floor_end)]
        ref = next((s for s in ("prealloc", "concat", "none") if s in runs), None)
        results = [self.result_record(c, runs[c.strategy], runs.get(ref), ref, floor0,
                                      floor_end, alloc.get(c.strategy)) for c in cells]
        return results, floors

    def floor_record(self, c: Cell, model: GPTModel, floor: Floor) -> dict:
        return {"model": c.model, "dtype": c.dtype, "device": c.device, "batch": c.batch,
                "new_tokens": c.new_tokens, "kv_len": floor.kv_len,
                "weight_nbytes": floor_nbytes(model), "kv_nbytes": floor.kv_nbytes,
                "ms": summary([1e3 * t for t in floor.times])}

    def result_record(self, c: Cell, runs: list[dict], ref_runs: list[dict] | None,
                      ref: str | None, floor0: Floor, floor_end: Floor,
                      alloc: list[dict] | None) -> dict:
        n_steps = len(runs[0]["steps"])
        steps = np.array([r["steps"] for r in runs]) * 1e3  # (repeats, steps) in ms
        curve = np.median(steps, axis=0) if n_steps else np.zeros(0)
        decode_tps = [c.batch * n_steps / sum(r["steps"]) for r in runs if n_steps]
        e2e_tps = [c.batch * (n_steps + 1) / r["wall"] for r in runs]
        match, first_diff = None, None
        if ref_runs is not None and c.strategy != ref:
            a, b = runs[0]["tokens"], ref_runs[0]["tokens"]
            diff = (a != b).any(dim=0).nonzero()
            match = diff.numel() == 0
            first_diff = None if match else int(diff[0])
        k = min(100, n_steps // 2) if n_steps >= 2 else 0
        floor_ms = float(np.median(floor0.times)) * 1e3 if floor0.times else float("nan")
        floor_end_ms = float(np.median(floor_end.times)) * 1e3 if floor_end.times else float("nan")
        end_ms = float(np.median(steps[:, -20:])) if n_steps >= 20 else float("nan")
        step_med = float(np.median(steps)) if n_steps else float("nan")
        return {
            **asdict(c), "backend": c.backend, "repeats": len(runs), "prompt_len": len(PROMPT),
            "window": self.window if c.strategy == "sliding" else None,
            "prefill_ms": summary([1e3 * r["prefill"] for r in runs]),
            "decode_tokens_per_s": summary(decode_tps),
            "e2e_tokens_per_s": summary(e2e_tps),
            "wall_s": summary([r["wall"] for r in runs]),
            "step_ms": {**percentiles(steps.ravel().tolist()), **summary(steps.ravel().tolist())},
            "first_ms": float(np.median(steps[:, :k])) if k else float("nan"),
            "last_ms": float(np.median(steps[:, -k:])) if k else float("nan"),
            "flat_window": k,
            "end_ms": end_ms,
            "floor_ratio": step_med / floor_ms,  # median step / floor (no KV)
            "end_floor_kv_ratio": end_ms / floor_end_ms,  # last 20 steps / floor + KV at the end
            "step_curve_ms": [round(float(x), 4) for x in curve],
            "cache_nbytes": runs[-1]["cache_nbytes"],
            "allocations": alloc,
            "tokens_ref": ref if c.strategy != ref else None,
            "tokens_match": match, "first_mismatch": first_diff,
        }

    # ------------------------------------------------------------------------- extras

    def no_cache_section(self, results: list[dict]) -> list[dict]:
        """Per-step cost without a cache, measured directly: one forward pass over L tokens
        (logits for the last position only, exactly what ``decode_one`` does without a cache),
        next to the cached step at the same length and the floor + KV at that length."""
        out = []
        keys = sorted({(r["model"], r["dtype"], r["device"], r["batch"]) for r in results
                       if r["strategy"] == "none"})
        for name, dtype, device, batch in keys:
            model = self.model(name, dtype, device)
            model.set_kv_cache("none")
            for L in self.no_cache_lengths:
                if L > model.cfg.context_length:
                    continue
                seq = torch.randint(0, model.cfg.vocab_size, (batch, L), device=device)
                times = []
                with torch.inference_mode():
                    decode_one(model, seq)  # warm-up
                    for _ in range(self.no_cache_repeats):
                        _sync(model.wte.weight.device)
                        t0 = time.perf_counter()
                        decode_one(model, seq)
                        _sync(model.wte.weight.device)
                        times.append(time.perf_counter() - t0)
                floor = Floor(model, batch, kv_len=L)
                floor.measure(3)
                floor.times.clear()
                floor.measure(10)
                cached = cached_step_at(results, name, dtype, device, batch, L)
                nc = float(np.median(times)) * 1e3
                out.append({"model": name, "dtype": dtype, "device": device, "batch": batch,
                            "length": L, "no_cache_ms": summary([1e3 * t for t in times]),
                            "cached_ms": cached, "floor_kv_ms": float(np.median(floor.times)) * 1e3,
                            "speedup": nc / cached if cached else None})
        return out

    def overhead_section(self, results: list[dict]) -> dict:
        """Per-step Python and dispatch overhead: the decode step of a twin of the first non-tiny
        model with the same layers and heads but 4-wide heads and a 256-token vocabulary, where
        arithmetic costs next to nothing; plus torch.profiler's view of one real decode step."""
        big = next((r for r in results if r["model"] != "tiny"), results[0])
        name, dtype, device = big["model"], big["dtype"], big["device"]
        cfg = GPTConfig.from_preset(name)
        narrow = GPTConfig.from_preset(name, emb_dim=4 * cfg.n_heads, vocab_size=256)
        torch.manual_seed(0)
        twin = GPTModel(narrow).to(device=device, dtype=DTYPES[dtype]).eval()
        idx = torch.tensor([[1, 2, 3, 4, 5, 6]], device=device)
        runners = {s: KvlibRunner(twin, s, self.window) for s in ("concat", "prealloc",
                                                                   "sliding")}
        try:
            hf = hf_twin(twin)
            runners.update({k: HFRunner(hf, k) for k in HF_KINDS})
        except ImportError:
            pass
        steps: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(3):
            for k, runner in runners.items():
                run = time_run(runner, idx, self.overhead_tokens)
                if r:  # the first round is a warm-up
                    steps[k] += run["steps"]
        twin_ms = {k: float(np.median(v)) * 1e3 for k, v in steps.items()}
        same = [r for r in results if (r["model"], r["dtype"], r["device"], r["batch"])
                == (name, dtype, device, 1)]
        n = min((r["new_tokens"] for r in same), default=None)  # the shortest run's steps
        real = {r["strategy"]: r["step_ms"]["p50"] for r in same if r["new_tokens"] == n}
        return {"model": name, "twin": {"emb_dim": narrow.emb_dim, "vocab_size": 256},
                "twin_step_ms": twin_ms, "real_step_ms": real, "real_new_tokens": n,
                "profile": profile_decode_step(self.model(name, dtype, device)),
                "gap": floor_gap(self.model(name, dtype, device))}


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


def profile_decode_step(model: GPTModel, n: int = 5, top: int = 8) -> dict:
    """torch.profiler over ``n`` prealloc decode steps: wall time and the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    p = next(model.parameters())
    idx = torch.tensor([PROMPT], device=p.device)
    model.set_kv_cache("prealloc", max_len=64)
    with torch.inference_mode():
        from .generate import prefill

        prefill(model, idx)
        seq = torch.cat([idx, idx[:, :1]], dim=1)
        decode_one(model, seq)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(n):
                decode_one(model, seq)
            wall = time.perf_counter() - t0
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in rows) / n / 1e3
    return {"steps": n, "wall_ms": wall / n * 1e3, "ops_self_ms": total_self,
            "top": [{"op": e.key, "calls": e.count // n,
                     "self_ms": e.self_cpu_time_total / n / 1e3} for e in rows[:top]]}


GAP_PARTS = ("layernorm", "gelu", "attention", "residual")  # small ops between weight reads


def functional_step(model: GPTModel, tok: Tensor, kv_len: int,
                    drop: frozenset[str] = frozenset()) -> Tensor:
    """A prealloc decode step of ``model`` as bare functional calls over its own weights: no
    modules, no checks, 2-D activations. The new token (position ``kv_len``) is written into slot
    ``kv_len`` of each layer's cache and attends over the ``kv_len`` tokens before it; the caches'
    counters do not move. ``drop`` leaves out kinds of small ops between the weight reads
    ("layernorm", "gelu", "attention": the cache write and attention, "residual": the adds), to
    measure what each costs; with nothing dropped the logits ``(B, vocab)`` equal ``decode_one``'s.
    """
    cfg = model.cfg
    H, D, C = cfg.n_heads, cfg.head_dim, cfg.emb_dim
    ln = "layernorm" not in drop

    def norm(x: Tensor, m: torch.nn.LayerNorm) -> Tensor:
        return F.layer_norm(x, (C,), m.weight, m.bias, m.eps) if ln else x

    x = model.wte.weight[tok[:, 0]] + model.wpe.weight[kv_len]  # (B, C)
    for block in model.h:
        attn, mlp, cache = block.attn, block.mlp, block.attn.kv_cache
        qkv = F.linear(norm(x, block.ln_1), attn.c_attn.weight, attn.c_attn.bias)  # (B, 3C)
        if "attention" in drop:
            y = qkv[:, :C]
        else:
            q, k, v = qkv.view(-1, 3, H, 1, D).unbind(1)  # 3 x (B, H, 1, D)
            cache.keys[:, :, kv_len : kv_len + 1] = k
            cache.values[:, :, kv_len : kv_len + 1] = v
            y = F.scaled_dot_product_attention(q, cache.keys[:, :, : kv_len + 1],
                                               cache.values[:, :, : kv_len + 1]).view(-1, C)
        y = F.linear(y, attn.c_proj.weight, attn.c_proj.bias)
        x = y if "residual" in drop else x + y
        h = F.linear(norm(x, block.ln_2), mlp.c_fc.weight, mlp.c_fc.bias)  # (B, 4C)
        if "gelu" not in drop:
            h = F.gelu(h, approximate="tanh")
        y = F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        x = y if "residual" in drop else x + y
    return F.linear(norm(x, model.ln_f), model.lm_head.weight)  # (B, vocab)


def floor_gap(model: GPTModel, kv_len: int = 100, rounds: int = 100) -> dict:
    """Where a decode step's time above the floor goes, measured on the real model.

    In turn, each round: kvlib's step (``decode_one``, prealloc, ``kv_len`` cached tokens), the same
    step as bare functional calls (``functional_step``), that step without each kind of small op,
    with only its matrix products left, and the floor. Medians over the rounds; the order rotates.
    A small op between two weight reads finds its code and data evicted by megabytes of weights,
    so it costs far more here than in a loop of its own."""
    p = next(model.parameters())
    tok = torch.tensor([PROMPT[:1]], device=p.device)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, kv_len), generator=gen).to(p.device)
    model.set_kv_cache("prealloc", max_len=kv_len + 1)
    floor = Floor(model, 1)
    with torch.inference_mode():
        model(prompt, use_cache=True, last_only=True)  # fills the caches with kv_len real tokens

        def module_step() -> Tensor:
            return decode_one(model, tok)

        variants: dict[str, Callable[[], Tensor]] = {
            "kvlib step (modules)": module_step,
            "bare functional step": lambda: functional_step(model, tok, kv_len)}
        for part in GAP_PARTS:
            variants[f"without {part}"] = (
                lambda part=part: functional_step(model, tok, kv_len, frozenset({part})))
        variants["matrix products only"] = (
            lambda: functional_step(model, tok, kv_len, frozenset(GAP_PARTS)))
        same = torch.allclose(module_step(), functional_step(model, tok, kv_len), atol=1e-4)
        times: dict[str, list[float]] = {k: [] for k in [*variants, "floor"]}
        names = list(variants) + ["floor"]
        for r in range(rounds + 3):  # 3 warm-up rounds
            for name in names[r % len(names):] + names[: r % len(names)]:
                for cache in model.caches:
                    cache.seen = kv_len
                model.pos = kv_len
                _sync(p.device)
                t0 = time.perf_counter()
                if name == "floor":
                    floor_step(floor.mats, floor.x)
                else:
                    variants[name]()
                _sync(p.device)
                if r >= 3:
                    times[name].append(time.perf_counter() - t0)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    n = model.cfg.n_layers
    return {"kv_len": kv_len, "rounds": rounds, "ms": ms, "same_logits": same,
            "ops_per_step": {"layernorm": 2 * n + 1, "gelu": n, "attention": n, "residual": 2 * n}}


def compile_check(preset: str = "gpt2", n: int = 100, rounds: int = 2) -> dict:
    """Does ``torch.compile`` pay for the preallocated cache's decode step on this machine?

    The same model run eagerly and through ``torch.compile(model, dynamic=True)`` (the cache's
    length changes every step), prefill eager, ``n - 1`` greedy decode steps each; the first
    compiled run includes the compilation. Rounds alternate eager and compiled."""
    model = load(preset, "float32", "cpu")
    compiled = torch.compile(model, dynamic=True)
    idx = torch.tensor([PROMPT])

    def run(forward) -> tuple[list[float], list[int]]:
        model.set_kv_cache("prealloc", max_len=len(PROMPT) + n)
        times, tokens = [], []
        with torch.inference_mode():
            tok = model(idx, use_cache=True, last_only=True)[:, -1].argmax(-1, keepdim=True)
            for _ in range(n - 1):
                t0 = time.perf_counter()
                tok = forward(tok, use_cache=True, last_only=True)[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t0)
                tokens.append(int(tok[0, 0]))
        return times, tokens

    run(model)  # warm-up
    t0 = time.perf_counter()
    _, first_tokens = run(compiled)
    compile_s = time.perf_counter() - t0
    eager, comp = [], []
    for _ in range(rounds):
        times, ref = run(model)
        eager += times
        times, tokens = run(compiled)
        comp += times
    return {"model": preset, "new_tokens": n, "threads": torch.get_num_threads(),
            "first_run_s": compile_s, "eager_step_ms": summary([1e3 * t for t in eager]),
            "compiled_step_ms": summary([1e3 * t for t in comp]),
            "same_tokens": tokens == ref and first_tokens == ref,
            "environment": environment_info("cpu")}


def lockstep(preset: str = "gpt2", new_tokens: tuple[int, ...] = (200, 1000), repeats: int = 3,
             strategy: str = "prealloc", progress: bool = True) -> dict:
    """kvlib, transformers' DynamicCache and the floor take turns, one decode step each.

    Separate runs, even interleaved, see a shared machine at different moments, and its speed drifts
    by ~10% within a minute. In lockstep the three advance together: step i of each runs within
    ~0.1 s of the others, at the same sequence length, so a slowdown hits all three alike. The
    order of the three rotates with the repeat. Flatness is also given per floor: each step divided
    by the floor step timed next to it, which cancels the drift left between the first and last
    100 steps."""
    from tqdm.auto import tqdm

    model = load(preset, "float32", "cpu")
    hf = hf_twin(model)
    idx = torch.tensor([PROMPT])
    floor = Floor(model, 1)
    out = {"schema": SCHEMA + "/lockstep", "model": preset, "strategy": strategy,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "environment": environment_info("cpu"), "runs": []}
    started = time.perf_counter()
    bar = tqdm(total=len(new_tokens) * (repeats + 1), desc="lockstep", unit="run",
               disable=not progress)
    for n in new_tokens:
        reps = []
        for r in range(-1, repeats):  # r = -1: an untimed warm-up of at most 64 tokens
            m = min(n, 64) if r < 0 else n
            streams = {"kvlib": KvlibRunner(model, strategy, 128).stream(idx, m),
                       "hf": HFRunner(hf, "hf-dynamic").stream(idx, m)}
            times: dict[str, list[float]] = {"kvlib": [], "hf": [], "floor": []}
            tokens: dict[str, list[Tensor]] = {"kvlib": [], "hf": []}
            order = ["kvlib", "hf", "floor"]
            order = order[r % 3:] + order[: r % 3]
            for _ in range(m):
                for who in order:
                    if who == "floor":
                        floor.times.clear()
                        floor.measure(1)
                        times["floor"].append(floor.times[0])
                    else:
                        tok, seconds = next(streams[who])
                        tokens[who].append(tok)
                        times[who].append(seconds)
            bar.update(1)
            if r < 0:
                continue
            reps.append({"order": order, "same_tokens": all(
                torch.equal(a, b) for a, b in zip(tokens["kvlib"], tokens["hf"], strict=True)),
                **{f"{k}_ms": [round(1e3 * t, 4) for t in v[1:]] for k, v in times.items()}})
        out["runs"].append({"new_tokens": n, "repeats": reps, **lockstep_summary(reps)})
    bar.close()
    out["duration_s"] = time.perf_counter() - started
    return out


def lockstep_summary(reps: list[dict]) -> dict:
    """Per repeat: kvlib / HF decode tokens/s, median step / median floor, and flatness (median
    of the last 100 steps / the first 100) raw and divided step by step by the floor; medians over
    the repeats. The prefill is not in the lists (as in ``run``, only decode steps count)."""
    def per(f: Callable[[dict], float]) -> dict:
        return summary([f(r) for r in reps])

    def med(r: dict, key: str) -> float:
        return float(np.median(r[key]))

    def flat(r: dict, xs: list[float]) -> float:
        k = min(100, len(xs) // 2)
        return float(np.median(xs[-k:]) / np.median(xs[:k]))

    return {
        "kvlib_over_hf_tokens_per_s": per(lambda r: sum(r["hf_ms"]) / sum(r["kvlib_ms"])),
        "step_over_floor": per(lambda r: med(r, "kvlib_ms") / med(r, "floor_ms")),
        "hf_over_floor": per(lambda r: med(r, "hf_ms") / med(r, "floor_ms")),
        "flatness": per(lambda r: flat(r, r["kvlib_ms"])),
        "flatness_per_floor": per(lambda r: flat(r, [
            a / b for a, b in zip(r["kvlib_ms"], r["floor_ms"], strict=True)])),
        "same_tokens": all(r["same_tokens"] for r in reps),
    }


def lockstep_targets(d: dict) -> list[dict]:
    """The ratio targets again, from a lockstep run: same rows as ``targets``, marked lockstep."""
    runs = {r["new_tokens"]: r for r in d["runs"]}
    s, out = d["strategy"], []
    for n, key, name, op, limit in [
            (200, "kvlib_over_hf_tokens_per_s", f"{s} / HF DynamicCache, decode tokens/s", ">=",
             1.2),
            (200, "step_over_floor", f"{s} median decode step / floor", "<=", 1.15),
            (1000, "kvlib_over_hf_tokens_per_s", f"{s} / HF DynamicCache, decode tokens/s", ">=",
             1.3),
            (1000, "flatness_per_floor", f"{s} median step, last 100 / first 100, each step "
             "divided by the floor step beside it", "<=", 1.25)]:
        v = runs[n][key]["median"] if n in runs else None
        out.append(target_row(f"{n} tokens, lockstep: {name}", v, op, limit))
    return out


def lockstep_text(d: dict) -> list[str]:
    L = ["## Lockstep: kvlib, DynamicCache and the floor in turn\n",
         f"`python -m kvlib.bench lockstep` ({d['created']}, {d['duration_s'] / 60:.1f} min, "
         f"{d['environment']['threads']} threads): {d['model']}, float32, batch 1, "
         f"`{d['strategy']}` against transformers' `DynamicCache` and the floor, one decode step "
         "of each in turn, so that drift hits all three alike; medians over the repeats (min-max "
         "in brackets). These are the same targets, measured a second, better-controlled way.\n",
         "| new tokens | repeats | kvlib / DynamicCache tok/s | step / floor | DynamicCache "
         "step / floor | last 100 / first 100 | same, per floor step | same tokens |",
         "|---|---|---|---|---|---|---|---|"]

    def cell(x: dict) -> str:
        return f"{x['median']:.3f} ({x['min']:.3f}-{x['max']:.3f})"

    for r in d["runs"]:
        L.append(f"| {r['new_tokens']} | {len(r['repeats'])} | "
                 f"{cell(r['kvlib_over_hf_tokens_per_s'])} | {cell(r['step_over_floor'])} | "
                 f"{cell(r['hf_over_floor'])} | {cell(r['flatness'])} | "
                 f"{cell(r['flatness_per_floor'])} | {'yes' if r['same_tokens'] else 'NO'} |")
    L.append("")
    return L


def compile_text(c: dict) -> str:
    e, k = c["eager_step_ms"]["median"], c["compiled_step_ms"]["median"]
    gain = e - k
    if gain > 0.05 * e:
        verdict = f"pays off: {gain:.2f} ms a step saved"
    else:
        how = "the compiled step is slower" if gain < 0 else "less than 5%, within the noise"
        verdict = (f"does not pay: {gain:+.2f} ms a step ({100 * gain / e:+.1f}%; {how}), so "
                   "kvlib ships no compile path")
    return (f"`torch.compile(model, dynamic=True)` on {c['model']} with the preallocated cache, "
            f"{c['new_tokens']} tokens, {c['threads']} thread(s): the first run (compilation "
            f"included; inductor's on-disk cache may shorten it) took {c['first_run_s']:.0f} s; "
            f"then a decode step takes {k:.2f} ms "
            f"compiled vs {e:.2f} ms eager (medians; IQR {c['compiled_step_ms']['q1']:.2f}-"
            f"{c['compiled_step_ms']['q3']:.2f} vs {c['eager_step_ms']['q1']:.2f}-"
            f"{c['eager_step_ms']['q3']:.2f}); same tokens: {c['same_tokens']}. Verdict: it "
            f"{verdict}. Measured by `python -m kvlib.bench compile`.")


# ----------------------------------------------------------------------------- targets

def find(results: list[dict], **kw) -> dict | None:
    return next((r for r in results if all(r.get(k) == v for k, v in kw.items())), None)


def target_row(name: str, value: float | None, op: str, limit: float, detail: str = "") -> dict:
    """One target: met (True/False), or None when the value was not measured (never a pass)."""
    ok = None if value is None or value != value else (
        value >= limit if op == ">=" else value <= limit)
    return {"target": name, "value": value, "op": op, "limit": limit, "met": ok, "detail": detail}


def targets(data: dict) -> list[dict]:
    """The issue's targets (gpt2, float32, batch 1, CPU), each met, not met or not measured."""
    res, threads = data["results"], data["environment"]["threads"]
    base = {"model": "gpt2", "dtype": "float32", "batch": 1, "device": "cpu"}
    out = []

    def add(name: str, value: float | None, op: str, limit: float, detail: str = "") -> None:
        out.append(target_row(name, value, op, limit, detail))


    hf200 = find(res, strategy="hf-dynamic", new_tokens=200, **base)
    # kvlib's caches that give the same tokens as HF (sliding attends to fewer: not compared)
    mine200 = [r for r in res if r["strategy"] in ("concat", "prealloc")
               and r["new_tokens"] == 200 and all(r[k] == v for k, v in base.items())]
    best = max(mine200, key=lambda r: r["decode_tokens_per_s"]["median"], default=None)
    if best and hf200:
        v = best["decode_tokens_per_s"]["median"] / hf200["decode_tokens_per_s"]["median"]
        add("200 tokens: fastest kvlib cache / HF DynamicCache, decode tokens/s", v, ">=", 1.2,
            f"{best['strategy']}")
    else:
        add("200 tokens: fastest kvlib cache / HF DynamicCache, decode tokens/s", None, ">=", 1.2)
    add("200 tokens: fastest kvlib cache's median decode step / floor",
        best["floor_ratio"] if best else None, "<=", 1.15, best["strategy"] if best else "")
    pre = find(res, strategy="prealloc", new_tokens=1000, **base)
    hf1k = find(res, strategy="hf-dynamic", new_tokens=1000, **base)
    add("1000 tokens: prealloc / HF DynamicCache, decode tokens/s",
        pre["decode_tokens_per_s"]["median"] / hf1k["decode_tokens_per_s"]["median"]
        if pre and hf1k else None, ">=", 1.3)
    add("1000 tokens: prealloc step at the end (last 20 steps) / (floor + KV read at 1006)",
        pre["end_floor_kv_ratio"] if pre else None, "<=", 1.2)
    add("1000 tokens: prealloc median step, last 100 / first 100",
        pre["last_ms"] / pre["first_ms"] if pre else None, "<=", 1.25)
    cat = find(res, strategy="concat", new_tokens=1000, **base)
    out.append({"target": "1000 tokens: concat median step, last 100 / first 100 (shown)",
                "value": cat["last_ms"] / cat["first_ms"] if cat else None, "op": "shown",
                "limit": None, "met": None if cat is None else True, "detail": ""})
    none = find(res, strategy="none", new_tokens=200, **base)
    if none and best:
        pre200 = find(res, strategy="prealloc", new_tokens=200, **base) or best
        v = none["wall_s"]["median"] / pre200["wall_s"]["median"]
        out.append({"target": "200 tokens end to end: no cache / prealloc, wall time (expect "
                    "~3.5-4x)", "value": v, "op": "shown", "limit": None, "met": True,
                    "detail": ""})
    if threads != 2:
        for t in out:
            t["detail"] = (t["detail"] + f"; measured with {threads} threads, the targets "
                           "assume 2").lstrip("; ")
    return out


# ----------------------------------------------------------------------------- report

def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def report(data: dict, plots_dir: str = "") -> str:
    """RESULTS.md: every table of a run, from its JSON."""
    env, res = data["environment"], data["results"]
    L = []
    L.append("# Benchmark results\n")
    L.append(f"Generated by `python -m kvlib.bench report` from the JSON of one run "
             f"({data['created']}, {data['duration_s'] / 60:.1f} min). Regenerate with the "
             "commands below; every number here comes from that JSON.\n")
    L.append("**Machine:** " + f"{env['cpu_model']}, {env['cpu_count']} CPUs, "
             f"torch {env['torch']} ({env['threads']} threads), Python {env['python']}, "
             f"transformers {env['transformers']}, {env['platform']}. "
             + ("GPU: " + env["gpu"] if env["gpu"] else "No GPU on this machine: every number "
                "is CPU-only; no GPU run was recorded.") + "\n")
    load0, load1 = env.get("load_avg"), data.get("load_avg_end")
    if load0 and load1:
        L.append(f"Load average (1 min) at the start {load0[0]:.2f}, at the end {load1[0]:.2f} "
                 f"on {env['cpu_count']} CPUs.\n")
    if data.get("note"):
        L.append(f"> {data['note']}\n")
    extra = ""
    if data.get("compile"):
        c = data["compile"]
        extra = (f"python -m kvlib.bench compile --model {c['model']} --new-tokens "
                 f"{c['new_tokens']} --threads {c['threads']} --out benchmarks/compile.json\n")
    if data.get("lockstep"):
        extra += data["lockstep"]["command"] + "\n"
    L.append("**Commands** (from the repository root):\n\n```bash\n" + data["command"] + "\n"
             + extra + "python -m kvlib.bench report benchmarks/results.json --plots-dir "
             "benchmarks" + (" --compile benchmarks/compile.json" if data.get("compile") else "")
             + (" --lockstep benchmarks/lockstep.json" if data.get("lockstep") else "")
             + " > benchmarks/RESULTS.md\n```\n")
    L.append("Workload: random weights (seed 123), prompt of 6 tokens, greedy. `hf-dynamic` and "
             "`hf-static` are transformers' `GPT2LMHeadModel` with `DynamicCache` and "
             "`StaticCache`, loaded with the same weights (`kvlib.pretrained.to_hf_state_dict`) "
             "and driven by the same loop (one token per step, last-position logits, argmax). "
             "Decode tokens/s counts every sequence of the batch and excludes the prefill; "
             "end-to-end (e2e) includes it. Spread: min-max over repeats. The floor is a bare "
             "chain of `F.linear` calls over the model's own weight matrices (every matrix read "
             "once, the tied head once); floor + KV adds one attention read of L cached tokens "
             "per layer.\n")

    L.append("## Targets\n")
    # The load at the start is other work; at the end it also counts the bench's own threads.
    loads = [load0[0]] if load0 else []
    if loads and max(loads) > 0.5 * env["cpu_count"]:
        L.append(f"**Caution:** other work kept this machine busy (load average "
                 f"{max(loads):.1f} on {env['cpu_count']} CPUs), and a slowdown that hits one "
                 "strategy's run and not another's skews a ratio: these verdicts are not final. "
                 "Compare the spreads in the tables below, and rerun on a quiet machine.\n")
    L.append("| target | measured | limit | met |\n|---|---|---|---|")
    for t in data["targets"] + (lockstep_targets(data["lockstep"]) if data.get("lockstep")
                                else []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        if t["op"] == "shown":
            met = "shown" if t["value"] is not None else "not measured"
        limit = "" if t["limit"] is None else f"{t['op']} {t['limit']}"
        detail = f" ({t['detail']})" if t["detail"] else ""
        L.append(f"| {t['target']}{detail} | {_fmt(t['value'])}x | {limit} | {met} |")
    L.append("")
    if data.get("lockstep"):
        L += lockstep_text(data["lockstep"])

    L.append("## Decode speed\n")
    groups: dict[tuple, list[dict]] = {}
    for r in res:
        groups.setdefault((r["model"], r["dtype"], r["device"], r["batch"], r["new_tokens"]),
                          []).append(r)
    for (m, d, dev, b, n), rows in groups.items():
        floor = next((f for f in data["floor"] if (f["model"], f["dtype"], f["device"],
                      f["batch"], f["kv_len"]) == (m, d, dev, b, 0)), None)
        fms = floor["ms"]["median"] if floor else None
        L.append(f"### {m}, {d}, {dev}, batch {b}, {n} new tokens ({rows[0]['repeats']} "
                 f"repeat(s))\n")
        if floor:
            L.append(f"Floor: {_fmt(fms)} ms per step ({_mib(floor['weight_nbytes'])} MiB of "
                     f"weights, {_fmt(floor['weight_nbytes'] / fms / 1e6, '.1f')} GB/s).\n")
        L.append("| strategy | decode tok/s (min-max) | e2e tok/s | prefill ms | step p50 / "
                 "p90 / p99 ms | step / floor | first / last 100 ms | cache MiB | allocs/step "
                 "(count, KiB) | same tokens |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            tps, s = r["decode_tokens_per_s"], r["step_ms"]
            al = r["allocations"]
            alloc = "; ".join(f"{a['count']:.0f}, {a['bytes'] / 1024:.0f} @{a['seq_len']}"
                              for a in al) if al else "n/a"
            if r["tokens_match"] is None:
                same = "reference" if r["tokens_ref"] is None and r["strategy"] != "none" \
                    else "n/a"
            else:
                same = ("yes" if r["tokens_match"] else
                        f"no, from token {r['first_mismatch']}") + f" (vs {r['tokens_ref']})"
                if r["strategy"] == "sliding" and not r["tokens_match"]:
                    same += ", expected past the window"
            L.append(
                f"| {r['strategy']} | {_fmt(tps['median'], '.1f')} ({_fmt(tps['min'], '.1f')}-"
                f"{_fmt(tps['max'], '.1f')}) | {_fmt(r['e2e_tokens_per_s']['median'], '.1f')} | "
                f"{_fmt(r['prefill_ms']['median'])} | {_fmt(s['p50'])} / {_fmt(s['p90'])} / "
                f"{_fmt(s['p99'])} | {_fmt(r['floor_ratio'])} | {_fmt(r['first_ms'])} / "
                f"{_fmt(r['last_ms'])} | {_mib(r['cache_nbytes'])} | {alloc} | {same} |")
        L.append("")
    L.append("Allocations: torch.profiler memory events (every allocator call with its size) "
             "over 3 decode steps, divided by 3, at the sequence length after `@`, in an untimed "
             "warm-up run; the generation loop's own work between steps is included.\n")

    L.append("## Floor and floor + KV\n")
    L.append("| model | dtype | batch | run (new tokens) | KV length | weights MiB | KV MiB | "
             "floor ms (IQR) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for f in data["floor"]:
        L.append(f"| {f['model']} | {f['dtype']} | {f['batch']} | {f['new_tokens']} | "
                 f"{f['kv_len']} | "
                 f"{_mib(f['weight_nbytes'])} | {_mib(f['kv_nbytes'])} | "
                 f"{_fmt(f['ms']['median'])} ({_fmt(f['ms']['q1'])}-{_fmt(f['ms']['q3'])}) |")
    L.append("")

    if data["no_cache"]:
        L.append("## Cache vs no cache, per step\n")
        L.append("A no-cache step is one forward pass over the whole sequence (logits for the "
                 "last position only), timed directly at each length; the cached step is the "
                 "median prealloc step around that length in the longest prealloc run.\n")
        L.append("| model | batch | length | no cache ms (min-max) | prealloc ms | floor + KV ms "
                 "| speed-up |")
        L.append("|---|---|---|---|---|---|---|")
        for x in data["no_cache"]:
            nc = x["no_cache_ms"]
            L.append(f"| {x['model']} | {x['batch']} | {x['length']} | {_fmt(nc['median'])} "
                     f"({_fmt(nc['min'])}-{_fmt(nc['max'])}) | {_fmt(x['cached_ms'])} | "
                     f"{_fmt(x['floor_kv_ms'])} | {_fmt(x['speedup'], '.1f')}x |")
        L.append("")

    ov = data.get("overhead")
    if ov:
        L.append("## Per-step overhead\n")
        L.append(f"Decode step of a twin of {ov['model']} with the same layers and heads but "
                 f"emb_dim={ov['twin']['emb_dim']} and a {ov['twin']['vocab_size']}-token "
                 "vocabulary: the arithmetic is negligible, what remains is Python, module calls "
                 "and op dispatch per step.\n")
        L.append(f"| strategy | twin step ms | real step ms ({ov.get('real_new_tokens')}-token "
                 "run) | overhead share |\n|---|---|---|---|")
        for k, v in ov["twin_step_ms"].items():
            real = ov["real_step_ms"].get(k)
            share = f"{100 * v / real:.0f}%" if real else "n/a"
            L.append(f"| {k} | {v:.3f} | {_fmt(real)} | {share} |")
        p = ov["profile"]
        L.append(f"\ntorch.profiler over {p['steps']} prealloc decode steps of {ov['model']}: "
                 f"{p['wall_ms']:.2f} ms per step (profiled), of which ops' self time "
                 f"{p['ops_self_ms']:.2f} ms.\n")
        L.append("| op | calls/step | self ms/step |\n|---|---|---|")
        for t in p["top"]:
            L.append(f"| `{t['op']}` | {t['calls']} | {t['self_ms']:.3f} |")
        L.append("")
        if ov.get("gap"):
            L += gap_text(ov["gap"], ov["model"])

    if data.get("compile"):
        L.append("## torch.compile\n")
        L.append(compile_text(data["compile"]) + "\n")

    L.append("## Plots\n")
    for name, title in PLOTS:
        if (Path(plots_dir or ".") / name).exists() or not plots_dir:
            L.append(f"![{title}]({name})\n")
    return "\n".join(L)


def gap_text(g: dict, model: str) -> list[str]:
    """The floor-gap table: each variant's step, its ratio to the floor, and for each left-out
    kind of op what one op of it cost (time saved / ops per step)."""
    ms, floor, bare = g["ms"], g["ms"]["floor"], g["ms"]["bare functional step"]
    L = ["## Where the time above the floor goes\n",
         f"`floor_gap` on {model}, prealloc, {g['kv_len']} cached tokens: kvlib's decode step, "
         "the same step written as bare functional calls (same logits: "
         f"{'yes' if g['same_logits'] else 'NO'}), that step without each kind of small op, "
         f"and the floor, one after the other in {g['rounds']} rounds (medians). The matrix "
         "products alone come close to the floor; the rest of the gap is the small ops between "
         "them (per op: what leaving that kind out saved; noisy, a negative value is noise) "
         "and the module code around them (modules vs bare step).\n",
         "| variant | step ms | / floor | saved vs bare step | ops per step | per op |",
         "|---|---|---|---|---|---|"]
    for name, v in ms.items():
        part = name.removeprefix("without ")
        n = g["ops_per_step"].get(part)
        saved = f"{bare - v:.2f} ms" if n else ""
        per = f"{1e3 * (bare - v) / n:.0f} us" if n else ""
        L.append(f"| {name} | {v:.2f} | {v / floor:.3f} | {saved} | {n or ''} | {per} |")
    L.append("")
    return L


# ----------------------------------------------------------------------------- plots

PLOTS = [("step_latency.png", "Decode step latency over a long generation"),
         ("tokens_per_s.png", "Decode tokens/s by strategy"),
         ("no_cache.png", "Per-step cost with and without a cache")]


def plot(data: dict, out_dir: str | Path) -> list[Path]:
    """Small PNGs: step latency curves, tokens/s bars, no cache vs cache per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res, written = data["results"], []
    colors = {"none": "tab:gray", "concat": "tab:red", "prealloc": "tab:blue",
              "sliding": "tab:green", "hf-dynamic": "tab:orange", "hf-static": "tab:purple"}

    # 1. Step latency over the longest run of the first non-tiny model.
    longest = max(res, key=lambda r: (r["model"] != "tiny", r["batch"] == 1, r["new_tokens"]))
    key = {k: longest[k] for k in ("model", "dtype", "device", "batch", "new_tokens")}
    rows = [r for r in res if all(r[k] == v for k, v in key.items())]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    for r in rows:
        y = np.asarray(r["step_curve_ms"])
        if y.size > 20:  # a running median of 9 steps keeps the trend, drops single spikes
            y = np.array([np.median(y[max(0, i - 4): i + 5]) for i in range(y.size)])
        x = np.arange(y.size) + r["prompt_len"] + 1
        ax.plot(x, y, lw=1.2, label=r["strategy"], color=colors.get(r["strategy"]))
    # The floor (no KV) and floor + KV at the lengths measured: a dashed line
    same = ("model", "dtype", "device", "batch")
    pts = {max(f["kv_len"], len(PROMPT) + 1): f["ms"]["median"] for f in data["floor"]
           if all(f[k] == key[k] for k in (*same, "new_tokens"))}
    pts.update({x["length"]: x["floor_kv_ms"] for x in data["no_cache"]
                if all(x[k] == key[k] for k in same) and x["length"] <= max(pts, default=0)})
    if pts:
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "k--", lw=1, marker=".", label="floor (+ KV read)")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"{key['model']}, {key['dtype']}, {key['device']}, batch {key['batch']}",
                 fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    written.append(_save(fig, out_dir / PLOTS[0][0]))

    # 2. Decode tokens/s per group with min-max bars.
    groups: dict[tuple, list[dict]] = {}
    for r in res:
        groups.setdefault((r["model"], r["dtype"], r["batch"], r["new_tokens"]), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(2.4 * len(groups) + 0.6, 3.2), dpi=90,
                             squeeze=False)
    for ax, ((m, d, b, n), rows) in zip(axes[0], groups.items(), strict=True):
        med = [r["decode_tokens_per_s"]["median"] for r in rows]
        err = [[r["decode_tokens_per_s"]["median"] - r["decode_tokens_per_s"]["min"]
                for r in rows], [r["decode_tokens_per_s"]["max"] -
                                 r["decode_tokens_per_s"]["median"] for r in rows]]
        ax.bar(range(len(rows)), med, yerr=err, capsize=2,
               color=[colors.get(r["strategy"]) for r in rows])
        ax.set_xticks(range(len(rows)), [r["strategy"] for r in rows], rotation=60, fontsize=7)
        ax.set_title(f"{m} {d}\nB={b}, {n} tokens", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_ylabel("decode tokens/s")
    fig.tight_layout()
    written.append(_save(fig, out_dir / PLOTS[1][0]))

    # 3. No cache vs cache per step.
    if data["no_cache"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=90)
        for m in sorted({x["model"] for x in data["no_cache"]}):
            xs = [x for x in data["no_cache"] if x["model"] == m and x["batch"] == 1]
            if not xs:
                continue
            lengths = [x["length"] for x in xs]
            ax.plot(lengths, [x["no_cache_ms"]["median"] for x in xs], "o-", color="tab:gray",
                    label=f"{m}: no cache (forward over L)")
            cached = [(x["length"], x["cached_ms"]) for x in xs if x["cached_ms"]]
            if cached:
                ax.plot(*zip(*cached, strict=True), "s-", color="tab:blue",
                        label=f"{m}: prealloc step")
            ax.plot(lengths, [x["floor_kv_ms"] for x in xs], "--", color="black", lw=1,
                    label=f"{m}: floor + KV")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel("one step (ms, log scale)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out_dir / PLOTS[2][0]))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI

def _csv(kind: Callable = str) -> Callable[[str], list]:
    return lambda s: [kind(x) for x in s.replace(",", " ").split()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kvlib.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run benchmarks, write JSON (and plots)")
    r.add_argument("--plan", choices=sorted(PLANS), help="a named set of suites (overrides the "
                   "grid options below)")
    r.add_argument("--models", type=_csv(), default=["gpt2"], help="e.g. tiny,gpt2,gpt2-medium")
    r.add_argument("--strategies", type=_csv(), default=["none", "concat", "prealloc",
                                                         "sliding"])
    r.add_argument("--new-tokens", type=_csv(int), default=[200])
    r.add_argument("--batch", type=_csv(int), default=[1])
    r.add_argument("--dtype", type=_csv(), default=["float32"], help="float32,bfloat16,float16")
    r.add_argument("--device", type=_csv(), default=["cpu"], help="cpu,cuda,mps")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--window", type=int, default=128, help="sliding window (tokens)")
    r.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave)")
    r.add_argument("--compare", choices=["hf"], help="also run transformers' DynamicCache and "
                   "StaticCache with the same weights")
    r.add_argument("--no-cache-lengths", type=_csv(int), default=[64, 256, 512, 1000])
    r.add_argument("--overhead", action="store_true", help="measure per-step overhead")
    r.add_argument("--overhead-tokens", type=int, default=100)
    r.add_argument("--floor-samples", type=int, default=20, help="floor steps timed per group")
    r.add_argument("--out", default="results.json")
    r.add_argument("--plots", help="directory for the PNG plots")
    r.add_argument("--note", default="", help="a line stored in the JSON and shown in the report")
    r.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="Markdown tables of a results JSON (to stdout)")
    rep.add_argument("json")
    rep.add_argument("--plots-dir", default="", help="where the PNGs are (to list only those)")
    rep.add_argument("--compile", help="a JSON written by the compile command, to include")
    rep.add_argument("--lockstep", help="a JSON written by the lockstep command, to include")
    ls = sub.add_parser("lockstep", help="kvlib, DynamicCache and the floor one step each, in "
                        "turn (needs transformers)")
    ls.add_argument("--model", default="gpt2")
    ls.add_argument("--strategy", default="prealloc", choices=["concat", "prealloc"])
    ls.add_argument("--new-tokens", type=_csv(int), default=[200, 1000])
    ls.add_argument("--repeats", type=int, default=3)
    ls.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave)")
    ls.add_argument("--out", default="lockstep.json")
    ls.add_argument("--no-progress", action="store_true")
    co = sub.add_parser("compile", help="eager vs torch.compile decode step (minutes)")
    co.add_argument("--model", default="gpt2")
    co.add_argument("--new-tokens", type=int, default=100)
    co.add_argument("--threads", type=int, default=2)
    co.add_argument("--out", default="compile.json")
    pl = sub.add_parser("plot", help="PNG plots of a results JSON")
    pl.add_argument("json")
    pl.add_argument("--dir", default=".")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cmd == "report":
        data = json.loads(Path(args.json).read_text())
        if args.compile:
            data["compile"] = json.loads(Path(args.compile).read_text())
        if args.lockstep:
            data["lockstep"] = json.loads(Path(args.lockstep).read_text())
        print(report(data, args.plots_dir))
        return
    if args.cmd == "compile":
        if args.threads:
            torch.set_num_threads(args.threads)
        c = compile_check(args.model, args.new_tokens)
        Path(args.out).write_text(json.dumps(c, indent=1) + "\n")
        print(compile_text(c))
        return
    if args.cmd == "lockstep":
        if args.threads:
            torch.set_num_threads(args.threads)
        d = lockstep(args.model, tuple(args.new_tokens), args.repeats, args.strategy,
                     progress=not args.no_progress)
        d["command"] = shlex.join(["python", "-m", "kvlib.bench",
                                   *(sys.argv[1:] if argv is None else argv)])
        Path(args.out).write_text(json.dumps(d, indent=1) + "\n")
        print("\n".join(lockstep_text(d)))
        return
    if args.cmd == "plot":
        for p in plot(json.loads(Path(args.json).read_text()), args.dir):
            print(p)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan:
        suites = PLANS[args.plan]
    else:
        suites = [Suite(args.models, args.strategies, args.new_tokens, args.batch, args.dtype,
                        args.device, args.repeats, args.compare == "hf")]
    argv = sys.argv[1:] if argv is None else argv
    bench = Bench(suites, warmup=args.warmup, window=args.window,
                  no_cache_lengths=tuple(args.no_cache_lengths), overhead=args.overhead,
                  overhead_tokens=args.overhead_tokens, floor_samples=args.floor_samples,
                  progress=not args.no_progress,
                  command=shlex.join(["python", "-m", "kvlib.bench", *argv]))
    data = bench.run()
    data["note"] = args.note
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.plots:
        for p in plot(data, args.plots):
            print(f"wrote {p}", file=sys.stderr)


if __name__ == "__main__":
    main()
