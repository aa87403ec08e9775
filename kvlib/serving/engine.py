"""Continuous batching over a paged cache (see ``kvlib.serving``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..caches.paged import BlockStorage, PagedBatch, PagedCache
from ..models import CausalLM, check_token_ids
from ..timing import Stopwatch
from .pool import BlockPool


@dataclass
class Request:
    """One request: its prompt, what it has produced, and its blocks."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # the block table
    cached_tokens: int = 0  # prompt tokens found in the pool (prefix hits): never computed
    state: str = "waiting"  # waiting -> running -> finished
    first_step: int | None = None  # the step it joined the batch
    finish_step: int | None = None

    @property
    def length(self) -> int:
        """Tokens whose keys and values the pool holds for it (the newest output not yet)."""
        return len(self.prompt) + max(len(self.output) - 1, 0)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class StepRecord:
    """What one engine step did, for pictures (``kvlib.plots.plot_engine_step``)."""

    step: int
    tables: dict[int, list[int]]  # request id -> its blocks, for every running request
    refs: list[int]  # every block's reference count after the step
    joined: list[int]  # requests prefilled in this step
    finished: list[int]  # requests that ended in this step
    waiting: list[int]  # requests that had arrived but had to wait
    filled: dict[int, int]  # request id -> tokens it holds
    stats: dict[str, int]  # ``Engine.stats`` after the step


class Engine:
    """Continuous batching over a paged cache (greedy decoding).

    ``add_request(ids, max_new_tokens, arrival_step)`` queues a request; ``step()`` advances the
    clock by one step: requests that have arrived join (first come, first served) while the pool
    can promise each the blocks it may need, each one is prefilled (only the part of its prompt
    that is not found in the pool), then every request that was already running decodes one
    token, all of them in one batched forward. ``run()`` steps until every request is done and
    returns ``{request id: prompt + output}``. ``stats`` counts blocks and bytes.

    Three pieces hold the state: ``pool`` (a ``BlockPool``: the books, which blocks are free,
    shared, findable by prefix), ``storage`` (a ``BlockStorage``: every layer's keys and values,
    under the same block ids) and ``batch`` (a ``PagedBatch``: the tables, positions and slots of
    the next forward), which ``caches``, one ``PagedCache`` per layer, read. The model keeps its
    own caches: the engine puts its paged views in for its forwards only.
    """

    def __init__(self, model: CausalLM, block_size: int = 16, num_blocks: int | None = None,
                 eos_id: int | None = None, prefix_caching: bool = True) -> None:
        cfg = model.cfg
        local = [i for i, spec in enumerate(model.layer_specs()) if spec.window is not None]
        if local:
            raise ValueError(
                f"kvlib.Engine pages every layer's keys for full attention, but layers {local} "
                "of this model attend over a window of their own (Gemma 3): generate with "
                "kvlib.generate(..., cache='paged'), which gives those layers rings of their "
                "window")
        if num_blocks is None:  # four full contexts, unless told
            num_blocks = 4 * math.ceil(cfg.context_length / block_size) \
                if isinstance(block_size, int) and block_size > 0 else 0
        p = next(model.parameters())
        self.model, self.eos_id, self.prefix_caching = model, eos_id, prefix_caching
        spec, n_layers = model.layer_specs()[0], len(model.attention_layers)  # what is cached
        self.pool = BlockPool(block_size, num_blocks)  # the books: ids, references, prefixes
        self.storage = BlockStorage(n_layers, spec.n_kv_heads, spec.head_dim, block_size,
                                    num_blocks, p.dtype, p.device)  # under the pool's block ids
        self.batch = PagedBatch(block_size)  # the next forward's tables, positions and slots
        self.caches = [PagedCache(self.storage, self.batch, i) for i in range(n_layers)]
        self.device = p.device
        self.requests: dict[int, Request] = {}
        self.clock = 0  # the next step's number
        self.history: list[StepRecord] = []
        self.prefill_seconds = 0.0  # time in prefill forwards (prefix hits make it shorter)
        self.decode_seconds = 0.0

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, ids: Tensor | list[int], max_new_tokens: int, arrival_step: int = 0
                    ) -> int:
        """Queue a request; returns its id. It joins at ``arrival_step`` or later."""
        prompt = ids if isinstance(ids, Tensor) else torch.tensor(ids)
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError("a request's prompt must be a 1-D tensor or a list of token ids, "
                             "with at least one token")
        check_token_ids(prompt[None], self.model.cfg.vocab_size)
        ids = prompt.tolist()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if arrival_step < 0:
            raise ValueError(f"arrival_step must be >= 0, got {arrival_step}")
        total = len(ids) + max_new_tokens - 1  # the last token never enters the cache
        need = self.pool.blocks_for(total)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"this request needs up to {total} tokens = {need} blocks of "
                f"{self.pool.block_size}, but the pool has {self.pool.num_blocks} blocks in all: "
                f"it can never run. Make the pool larger (Engine(num_blocks=...)) or ask for "
                f"fewer tokens")
        ctx = self.model.cfg.context_length
        if self.model.hard_context and total > ctx:
            raise ValueError(f"prompt + max_new_tokens - 1 = {total} positions, but the model "
                             f"has {ctx}: ask for at most {ctx - len(ids) + 1} new tokens")
        rid = len(self.requests)
        self.requests[rid] = Request(rid, list(ids), max_new_tokens, arrival_step)
        return rid

    def fork(self, request_id: int, max_new_tokens: int | None = None) -> int:
        """A new request that continues ``request_id`` from where it is now, sharing all of its
        blocks (parallel sampling). The first write into a shared block copies it."""
        parent = self._get(request_id)
        if parent.state != "running":
            raise ValueError(f"request {request_id} is {parent.state}: only a running request "
                             "can be forked")
        n = max_new_tokens or parent.max_new_tokens
        rid = len(self.requests)
        child = Request(rid, list(parent.prompt), n, self.clock, list(parent.output),
                        list(parent.blocks), parent.cached_tokens, "running", self.clock)
        running = [r for r in self.requests.values() if r.state == "running"]
        promised = sum(self._future_blocks(r) for r in running)
        if self._future_blocks(child) + 1 > len(self.pool.free) - promised:  # +1: a copy
            raise RuntimeError(f"no room to fork request {request_id} now: the pool cannot "
                               "promise the fork its blocks; fork later or make the pool larger")
        for b in child.blocks:
            self.pool.share(b)
        self.requests[rid] = child
        return rid

    def result(self, request_id: int) -> Tensor:
        """Prompt and output of a request so far, as a 1-D tensor."""
        return torch.tensor(self._get(request_id).tokens)

    def _get(self, request_id: int) -> Request:
        if request_id not in self.requests:
            raise KeyError(f"unknown request id {request_id!r}; the engine has ids "
                           f"0..{len(self.requests) - 1} (add_request returns them)")
        return self.requests[request_id]

    # ---- scheduling -----------------------------------------------------------------------
    def _future_blocks(self, r: Request) -> int:
        """Blocks a running request may still take (the most it can need, less what it holds)."""
        return self.pool.blocks_for(len(r.prompt) + r.max_new_tokens - 1) - len(r.blocks)

    def _prefix_hits(self, r: Request) -> list[int]:
        """The blocks of the pool that already hold the start of this prompt (full blocks only,
        and never the whole prompt: its last token must be computed to give the first logits)."""
        if not self.prefix_caching:
            return []
        bs, hits, parent = self.pool.block_size, [], 0
        for start in range(0, len(r.prompt) - 1 - (len(r.prompt) - 1) % bs, bs):
            tokens = tuple(r.prompt[start : start + bs])
            block = self.pool.lookup(parent, tokens)
            if block is None:
                break
            hits.append(block)
            parent = self.pool.prefix_hash(parent, tokens)
        return hits

    def _admit(self, r: Request, running: list[Request]) -> bool:
        """Take ``r`` into the batch if the pool can promise it every block it may need."""
        hits = self._prefix_hits(r)
        need = self.pool.blocks_for(len(r.prompt) + r.max_new_tokens - 1) - len(hits)
        promised = sum(self._future_blocks(q) for q in running)
        free = len(self.pool.free) - sum(self.pool.refs[b] == 0 for b in hits)
        if need > free - promised:
            return False
        for b in hits:
            self.pool.share(b)
        r.blocks, r.cached_tokens = list(hits), len(hits) * self.pool.block_size
        r.state, r.first_step = "running", self.clock
        return True

    def _register_prompt(self, r: Request) -> None:
        """Make the prompt's full blocks findable by later requests."""
        bs, parent = self.pool.block_size, 0
        for i in range(len(r.prompt) // bs):
            tokens = tuple(r.prompt[i * bs : (i + 1) * bs])
            parent = self.pool.register(r.blocks[i], parent, tokens)

    def _writable(self, r: Request, upto: int) -> None:
        """Give ``r`` blocks for its tokens below ``upto``: new ones as needed, and its own copy
        of a shared block it is about to write into."""
        bs = self.pool.block_size
        while len(r.blocks) < self.pool.blocks_for(upto):
            r.blocks.append(self.pool.allocate())
        first = r.length // bs if r.output else r.cached_tokens // bs
        for i in range(first, len(r.blocks)):
            shared = r.blocks[i]
            if self.pool.refs[shared] > 1:  # copy-on-write: the books, then the tensors
                r.blocks[i] = self.pool.copy_on_write(shared)
                self.storage.copy(shared, r.blocks[i])

    def _finish(self, r: Request) -> None:
        for b in r.blocks:
            self.pool.release(b)
        r.blocks, r.state, r.finish_step = [], "finished", self.clock

    def _done(self, r: Request) -> bool:
        return len(r.output) >= r.max_new_tokens or (
            self.eos_id is not None and r.output[-1] == self.eos_id)

    @contextlib.contextmanager
    def _paged(self) -> Iterator[None]:
        """The model with the engine's paged caches in, for one step; its own put back."""
        with self.model.using(self.caches), torch.inference_mode():
            yield

    def _forward(self, rows: list[Request], ids: Tensor, starts: list[int]) -> Tensor:
        """Greedy next tokens ``(B,)`` for ``ids`` ``(B, T)``, row b continuing at ``starts[b]``."""
        self.batch.set([r.blocks for r in rows], starts, ids.shape[1], self.device)
        logits = self.model(ids, use_cache=True, last_only=True, check_ids=False)
        return logits[:, -1].argmax(dim=-1)  # (B,)

    def step(self) -> StepRecord:
        """Advance one step: admit and prefill arrivals, decode one token for the others."""
        running = [r for r in self.requests.values() if r.state == "running"]
        decoding = list(running)  # prefilled in an earlier step
        joined, waiting, finished = [], [], []
        with self._paged():
            for r in self.requests.values():  # first come, first served
                if r.state != "waiting" or r.arrival_step > self.clock:
                    continue
                if waiting or not self._admit(r, running):
                    waiting.append(r.id)  # no overtaking: later arrivals wait behind it
                    continue
                with Stopwatch(self.device) as sw:
                    self._writable(r, len(r.prompt))
                    ids = torch.tensor([r.prompt[r.cached_tokens :]], device=self.device)
                    r.output.append(int(self._forward([r], ids, [r.cached_tokens])[0]))
                self.prefill_seconds += sw.seconds
                self._register_prompt(r)
                running.append(r)
                joined.append(r.id)
            if decoding:
                with Stopwatch(self.device) as sw:
                    for r in decoding:
                        self._writable(r, r.length + 1)
                    ids = torch.tensor([[r.output[-1]] for r in decoding],
                                       device=self.device)  # (B, 1)
                    nxt = self._forward(decoding, ids, [r.length for r in decoding])
                    for r, t in zip(decoding, nxt.tolist(), strict=True):
                        r.output.append(t)
                self.decode_seconds += sw.seconds
        for r in running:
            if self._done(r):
                self._finish(r)
                finished.append(r.id)
        record = StepRecord(
            self.clock, {r.id: list(r.blocks) for r in running if r.state == "running"},
            list(self.pool.refs), joined, finished, waiting,
            {r.id: r.length for r in running if r.state == "running"}, self.stats)
        self.history.append(record)
        self.clock += 1
        return record

    @property
    def pending(self) -> bool:
        return any(r.state != "finished" for r in self.requests.values())

    def run(self, progress: bool = False) -> dict[int, Tensor]:
        """Step until every request has finished; ``{request id: prompt + output}``."""
        from tqdm.auto import tqdm

        def made() -> int:
            return sum(len(r.output) for r in self.requests.values())

        total = sum(r.max_new_tokens for r in self.requests.values())
        with tqdm(total=total, initial=made(), desc="engine", unit="tok",
                  disable=not progress) as bar:
            while self.pending:
                self.step()
                if progress:
                    bar.update(made() - bar.n)
        return {rid: self.result(rid) for rid in self.requests}

    # ---- accounting -----------------------------------------------------------------------
    def slots_by_step(self) -> dict[str, list[int]]:
        """Token slots at every step so far: ``paged`` (the blocks in use, whole), ``used``
        (their filled slots, a shared block once), ``tokens`` (every running request's tokens,
        shared ones counted for each) and ``running`` (requests in the batch)."""
        bs, h = self.pool.block_size, self.history
        per_token = self.storage.block_nbytes // bs
        return {"paged": [r.stats["blocks_used"] * bs for r in h],
                "used": [r.stats["bytes_used"] // per_token for r in h],
                "tokens": [sum(r.filled.values()) for r in h],
                "running": [len(r.tables) for r in h]}

    @property
    def stats(self) -> dict[str, int]:
        """Blocks and bytes now: ``blocks_used`` (held by a request), ``blocks_shared`` (held
        by more than one), ``blocks_cached`` (free, but still findable by prefix),
        ``bytes_reserved`` (the used blocks) and ``bytes_used`` (their filled slots)."""
        pool, bs = self.pool, self.pool.block_size
        used = [b for b in range(pool.num_blocks) if pool.refs[b] > 0]
        filled: dict[int, int] = {}
        for r in self.requests.values():
            if r.state != "running":
                continue
            for i, b in enumerate(r.blocks):
                filled[b] = max(filled.get(b, 0), min(bs, r.length - i * bs))
        per_token = self.storage.block_nbytes // bs
        return {
            "blocks_total": pool.num_blocks,
            "blocks_used": len(used),
            "blocks_shared": sum(pool.refs[b] > 1 for b in used),
            "blocks_cached": sum(b in pool.prefix_of for b in pool.free),
            "bytes_reserved": len(used) * self.storage.block_nbytes,
            "bytes_used": sum(filled.values()) * per_token,
            "prefix_hit_tokens": sum(r.cached_tokens for r in self.requests.values()),
        }
