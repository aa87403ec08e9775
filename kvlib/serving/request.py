"""What the engine keeps per request, and what it records per step (see ``kvlib.serving``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..sampling import sample


@dataclass
class Request:
    """One request: its prompt, how it draws its tokens, what it has produced, and its blocks.

    A request that runs is one row of the batch. Beam search and ``Engine.fork`` make families
    of rows: every row is a ``Request`` of its own (its own block table and output), and rows that
    wait to start with another (``joins``) share that one's blocks when its prompt is done.
    """

    id: int
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    seed: int | None = None  # seeds ``generator``, the request's own draws
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # the block table
    cached_tokens: int = 0  # prompt tokens found in the pool (prefix hits): never computed
    computed: int = 0  # prompt tokens whose keys and values are in the pool (hits and chunks)
    state: str = "waiting"  # waiting -> prefilling -> running -> finished
    first_step: int | None = None  # the step it joined the batch (its prefill began)
    finish_step: int | None = None
    joins: int | None = None  # waits for this request's prompt, then shares its blocks
    beam_of: int | None = None  # a beam search's row: the id of its first row (the result)
    score: float = 0.0  # a beam's cumulative log-probability
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    @property
    def length(self) -> int:
        """Tokens whose keys and values the pool holds for it (the newest output not yet)."""
        if not self.output:
            return self.computed
        return len(self.prompt) + len(self.output) - 1

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def most_tokens(self) -> int:
        """The most tokens it will ever hold in the pool (its last token never enters it)."""
        return len(self.prompt) + self.max_new_tokens - 1

    def next_token(self, logits: Tensor) -> int:
        """Its next token from last-position logits ``(1, vocab)``: the argmax at temperature 0,
        else one draw from its own generator (``kvlib.sampling.sample``, as ``generate`` draws:
        with the same seed, a request gets the tokens it gets alone, whatever else runs)."""
        return int(sample(logits, self.temperature, self.top_k, self.generator)[0, 0])


def check_sampling(temperature: float, top_k: int | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive number of tokens (or None), got {top_k!r}")


def new_generator(seed: int | None, device: torch.device) -> tuple[int, torch.Generator]:
    """A request's own generator; without a seed, one drawn from torch's global generator (so
    ``torch.manual_seed`` still makes a run repeatable)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    return seed, torch.Generator(device=device).manual_seed(seed)


@dataclass
class StepRecord:
    """What one engine step did: for pictures (``kvlib.plots.plot_engine_step``) and for the
    latency of each request (a request got a token in every step it ``joined`` or ``decoded``;
    the time between two of its tokens is the wall time of the steps between them)."""

    step: int
    tables: dict[int, list[int]]  # request id -> its blocks, for every request in the batch
    refs: list[int]  # every block's reference count after the step
    joined: list[int]  # requests whose prompt was done in this step: their first token
    finished: list[int]  # requests that ended in this step
    waiting: list[int]  # requests that had arrived but could not start
    filled: dict[int, int]  # request id -> tokens it holds
    stats: dict[str, int]  # ``Engine.stats`` after the step
    decoded: list[int] = field(default_factory=list)  # requests that decoded a token
    prefilled: dict[int, int] = field(default_factory=dict)  # request id -> prompt tokens run
    seconds: float = 0.0  # wall time of the step (``kvlib.timing.Stopwatch``)

    @property
    def tokens(self) -> int:
        """Tokens the step's forwards computed: one per decode and every prompt chunk's."""
        return len(self.decoded) + sum(self.prefilled.values())
