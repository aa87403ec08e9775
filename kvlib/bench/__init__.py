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
  baseline with no cache, one forward pass over the whole sequence timed directly at a few lengths.

The modules, in the order a run uses them:

| module | what it holds |
|---|---|
| ``plan`` | ``Suite``, ``Cell``, the named ``PLANS`` and the checks that refuse a cell |
| ``runners`` | the timed generation loops (kvlib's, transformers'), ``hf_twin``, ``time_run`` |
| ``floor`` | the weight-streaming floor of any ``kvlib.CausalLM`` |
| ``profiling`` | allocations per decode step and the ops of one, from torch.profiler |
| ``run`` | ``Bench``: the timed groups and the extras (steps with no cache, overhead) |
| ``overhead`` | the narrow twin, ``functional_step``, ``floor_gap``, ``compile_check`` |
| ``gap`` | a Llama step as bare functional calls (``floor_gap``), fused projections too |
| ``lockstep`` | kvlib, DynamicCache, the floor (and compiled decoding) one step each, in turn |
| ``targets`` | the targets and their limits (medians and spreads: ``kvlib.measure.stats``) |
| ``report``, ``figures`` | RESULTS.md and the PNGs, from the JSON |
| ``streaming``, ``serving``, ``compress`` | past the context, many requests, compressed caches |
| ``surgery`` | the engine: latency with and without chunked prefill, blocks forks and beams share |
| ``speculative`` | prompt lookup, a draft model: against plain decoding and transformers' |
| ``latent`` | latent attention's decode step, naive against absorbed, by context length |
| ``cli`` | the command line |
"""

from ..measure.floor import (
    Floor,
    FloorChain,
    attention_points,
    cache_shapes,
    floor_nbytes,
    floor_step,
    floor_weights,
)
from ..measure.stats import percentiles, summary
from .cli import main
from .figures import PLOTS, plot
from .lockstep import lockstep, lockstep_summary, lockstep_text
from .overhead import GAP_PARTS, compile_check, floor_gap, functional_step
from .plan import DTYPES, HF_KINDS, PLANS, PROMPT, SCHEMA, Cell, Suite
from .profiling import alloc_steps, count_allocations, profile_decode_step
from .report import compile_text, report
from .run import Bench
from .runners import HFRunner, KvlibRunner, hf_twin, time_run
from .targets import lockstep_targets, targets

__all__ = [
    "DTYPES", "GAP_PARTS", "HF_KINDS", "PLANS", "PLOTS", "PROMPT", "SCHEMA", "Bench", "Cell",
    "Floor", "FloorChain", "HFRunner", "KvlibRunner", "Suite", "alloc_steps", "attention_points",
    "cache_shapes", "compile_check", "compile_text", "count_allocations", "floor_gap",
    "floor_nbytes", "floor_step", "floor_weights", "functional_step", "hf_twin", "lockstep",
    "lockstep_summary", "lockstep_targets", "lockstep_text", "main", "percentiles", "plot",
    "profile_decode_step", "report", "summary", "targets", "time_run",
]
