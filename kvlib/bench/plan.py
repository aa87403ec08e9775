"""What a run measures: suites of cells (model x strategy x new tokens x batch x dtype x device),
the named plans, and the checks that refuse a cell before any timing starts."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..caches import STRATEGIES
from ..models import PRESETS

SCHEMA = "kvlib-bench/1"
PROMPT = [464, 1994, 284, 3049, 5270, 318]  # "The key to fast generation is": 6 GPT-2 tokens
HF_KINDS = ("hf-dynamic", "hf-static")  # transformers' DynamicCache and StaticCache
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    def groups(self) -> list[list[Cell]]:
        """Cells timed together (interleaved): one group per model/dtype/device/batch/N."""
        strategies = list(self.strategies) + (list(HF_KINDS) if self.compare_hf else [])
        return [[Cell(m, s, n, b, d, dev) for s in strategies]
                for m, d, dev, b, n in itertools.product(self.models, self.dtypes, self.devices,
                                                         self.batches, self.new_tokens)]


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


# "full" is the run behind benchmarks/RESULTS.md. The gpt2 rows behind the targets get more
# repeats (a shared machine drifts); the baseline with no cache runs 200 tokens once, for the
# end-to-end speed-up; per step it is timed at fixed lengths.
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
    # The Qwen3-0.6B shape against transformers' Qwen3ForCausalLM, and bfloat16 against float32
    # for both families (issue 12's targets).
    "modern": [
        Suite(["qwen3-0.6b"], ["concat", "prealloc"], [200], repeats=3, compare_hf=True),
        Suite(["qwen3-0.6b"], ["prealloc"], [200], dtypes=["bfloat16"], repeats=3),
        Suite(["gpt2"], ["prealloc"], [200], dtypes=["float32", "bfloat16"], repeats=3),
        Suite(["tiny-llama", "tiny-qwen3"], ["none", "concat", "prealloc", "sliding"], [200],
              repeats=3, compare_hf=True),
    ],
    "quick": [  # the tiny model only (what the tests run)
        Suite(["tiny"], ["none", "concat", "prealloc", "sliding"], [32], repeats=2,
              compare_hf=True),
    ],
}


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--devices {device}: torch sees no CUDA GPU here; use --devices cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("--devices mps: MPS is not available here; use --devices cpu")


def check_cell(cell: Cell) -> None:
    """Refuse, before any timing, a cell that cannot run: no such device, strategy or model, or
    more tokens than the model has positions."""
    check_device(cell.device)
    if cell.strategy not in STRATEGIES and cell.strategy not in HF_KINDS:
        raise SystemExit(f"unknown strategy {cell.strategy!r}; choose from {list(STRATEGIES)} "
                         "(HF caches come with --compare hf)")
    if cell.model not in PRESETS:
        raise SystemExit(f"unknown model {cell.model!r}; choose from {list(PRESETS)}")
    ctx = PRESETS[cell.model].context_length
    if cell.strategy != "none" and len(PROMPT) + cell.new_tokens > ctx:
        raise SystemExit(f"{cell.model}: {len(PROMPT)} prompt + {cell.new_tokens} new "
                         f"tokens exceed its {ctx} positions; ask for fewer")
