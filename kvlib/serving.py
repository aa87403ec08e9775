"""Serving many requests at once: a paged KV cache with prefix sharing, and continuous batching.

A server does not know how long an answer will be. Reserving a contiguous cache for the longest
possible request wastes most of it (the vLLM paper measured 60-80% of KV memory in systems that
did). Paging cuts the cache into **blocks** of ``block_size`` tokens, the way an operating system
cuts memory into pages:

- ``BlockPool`` holds every layer's keys and values for ``num_blocks`` blocks, hands out free
  blocks on demand and takes them back when a request ends. A request's **block table** lists its
  blocks in order: token ``t`` lives in block ``table[t // block_size]``, slot
  ``t % block_size``. Only a request's last block is partly empty, so the waste is under one
  block per request.
- Blocks carry **reference counts**, so requests can share them. A prompt's full blocks are
  registered under a hash of their tokens and of every token before them (the **prefix**): a new
  request whose prompt starts with the same blocks takes them instead of computing them again
  (**prefix caching**). A block whose count drops to 0 is free again but keeps its contents
  until it is handed out, so a later request may still find it. A request that must write into a
  block that others also use gets its own copy first (**copy-on-write**; ``Engine.fork``).
- ``PagedCache`` is one layer's view of the pool. Attention gathers a batch's blocks into one
  ``(B, H, blocks * block_size, D)`` tensor per step (see ``PagedCache.update`` for why).
- ``Engine`` runs requests with **continuous batching**: at every step, requests that have
  arrived join as soon as the pool can promise them every block they may need, each request gets
  one new token, and a finished request leaves at once and frees its blocks for the next.

Greedy decoding only: the engine is here to show memory and scheduling, and greedy tokens let the
tests check that every request gets exactly the tokens it gets alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import KVCache
from .models import CausalLM, check_token_ids


class BlockPool:
    """Keys and values of every layer for ``num_blocks`` blocks of ``block_size`` tokens, with a
    reference count per block and a table of the full blocks that can be shared by prefix."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive number of tokens, got {block_size!r}"
                             " (vLLM uses 16)")
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)  # (L, N, bs, H, D)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = [0] * num_blocks  # how many block tables hold each block
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # oldest freed first
        self.by_prefix: dict[int, int] = {}  # prefix hash -> the block that holds it
        self.prefix_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (hash, tokens)
        # The batch the next forward computes, set once by ``set_batch`` and read by every layer.
        self.tables: Tensor | None = None  # (B, n): each row's block table, padded with block 0
        self.positions: Tensor | None = None  # (B, T): the new tokens' positions in their rows
        self.write_at: Tensor | None = None  # (B * T,): each new token's slot in the whole pool
        self.mask: Tensor | None = None  # (B, 1, T, n * block_size): what each query may see

    def set_batch(self, tables: list[list[int]], starts: list[int], T: int) -> None:
        """The next forward: row b, with block table ``tables[b]``, holds ``starts[b]`` tokens
        and brings ``T`` new ones. Everything the layers need is computed here, once per forward,
        not once per layer."""
        n, bs = max(len(t) for t in tables), self.block_size
        device = self.keys.device
        self.tables = torch.tensor([t + [0] * (n - len(t)) for t in tables], device=device)
        start = torch.tensor(starts, device=device)  # (B,)
        self.positions = start[:, None] + torch.arange(T, device=device)  # (B, T)
        block = self.tables.gather(1, self.positions // bs)  # (B, T): its block, and in it
        self.write_at = (block * bs + self.positions % bs).view(-1)  # the slot of the pool
        slot = torch.arange(n * bs, device=device)  # the gathered keys' slots, in table order
        self.mask = (slot[None, None, :] <= self.positions[:, :, None])[:, None]  # causal

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block: keys and values of every layer."""
        return 2 * self.keys[:, 0].numel() * self.keys.element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self) -> int:
        """A free block, the one freed longest ago (its prefix, if any, is forgotten)."""
        if not self.free:
            raise RuntimeError("the block pool is empty: every block is in use "
                               "(the engine admits a request only when its blocks are certain)")
        block = next(iter(self.free))
        del self.free[block]
        self._forget(block)
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more table holds ``block`` (a prefix hit, a fork)."""
        if self.refs[block] == 0:
            del self.free[block]  # a cached block nobody held: back in use, contents intact
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """One table fewer holds ``block``; at 0 it is free (its contents stay findable)."""
        if self.refs[block] <= 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None

    def copy(self, block: int) -> int:
        """Copy-on-write: a new block with the same keys and values in every layer."""
        new = self.allocate()
        self.keys[:, new] = self.keys[:, block]
        self.values[:, new] = self.values[:, block]
        self.release(block)
        return new

    @staticmethod
    def prefix_hash(parent: int, tokens: tuple[int, ...]) -> int:
        """A block's key: its tokens and (through ``parent``, the previous block's key) every
        token before it. Same key, same keys and values."""
        return hash((parent, tokens))

    def register(self, block: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Make a full block findable by its prefix; returns its hash."""
        h = self.prefix_hash(parent, tokens)
        if h not in self.by_prefix:
            self.by_prefix[h] = block
            self.prefix_of[block] = (h, tokens)
        return h

    def lookup(self, parent: int, tokens: tuple[int, ...]) -> int | None:
        """The block holding these tokens after this prefix, if the pool still has it."""
        block = self.by_prefix.get(self.prefix_hash(parent, tokens))
        if block is None or self.prefix_of[block][1] != tokens:  # a hash collision: no hit
            return None
        return block

    def _forget(self, block: int) -> None:
        entry = self.prefix_of.pop(block, None)
        if entry is not None:
            del self.by_prefix[entry[0]]


class PagedCache(KVCache):
    """One layer's keys and values, kept in the blocks of a shared ``BlockPool``.

    The engine sets the batch (``pool.tables``, ``pool.lengths``) before each forward; every row
    may hold a different number of tokens. ``update`` writes the new tokens into their slots and
    returns the batch's blocks gathered into ``(B, H, blocks * block_size, D)``; ``batch_mask``
    hides each row's empty slots and future tokens.

    Why gather: PyTorch has no attention kernel that reads keys through a block table (vLLM and
    FlashInfer write their own, which read each block where it lies). The gather is one copy of
    the batch's live blocks per layer per step, the same bytes attention reads anyway, and then
    the ordinary fused ``scaled_dot_product_attention`` runs on it. ``python -m kvlib.bench
    serving`` measures what it costs against a contiguous cache.
    """

    name = "paged"

    def __init__(self, pool: BlockPool, layer: int) -> None:
        super().__init__()
        self.pool, self.layer = pool, layer

    @property
    def capacity(self) -> int | None:
        return self.pool.num_blocks * self.pool.block_size

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes // self.pool.keys.shape[0]  # this layer's share of the pool

    def positions(self, T: int) -> Tensor:
        return self.pool.positions  # (B, T), set by pool.set_batch

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, None)
        pool = self.pool
        K, V = pool.keys[self.layer], pool.values[self.layer]  # (N, bs, H, D)
        B, H, T, D = keys.shape
        slots = pool.write_at  # (B * T,) into the pool seen as one run of N * bs slots
        K.view(-1, H, D).index_copy_(0, slots, keys.transpose(1, 2).reshape(B * T, H, D))
        V.view(-1, H, D).index_copy_(0, slots, values.transpose(1, 2).reshape(B * T, H, D))
        n = pool.tables.shape[1]
        rows = pool.tables.view(-1)  # every row's blocks, in table order
        S = n * pool.block_size
        k = K.index_select(0, rows).view(B, S, *K.shape[2:]).transpose(1, 2)  # (B, H, S, D)
        v = V.index_select(0, rows).view(B, S, *V.shape[2:]).transpose(1, 2)
        self.seen += T
        return k, v

    def batch_mask(self, q_len: int, kv_len: int) -> Tensor:
        """Row b's query t sees slots ``0 .. start[b] + t`` of its gathered blocks: its own
        tokens, nothing after (the rest of its last block and the padding of its table)."""
        return self.pool.mask  # (B, 1, T, S)

    def reset(self) -> None:
        super().reset()  # the blocks belong to the engine's requests, not to this view


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

    The model keeps its own caches: the engine puts its paged views in for its forwards only.
    """

    def __init__(self, model: CausalLM, block_size: int = 16, num_blocks: int | None = None,
                 eos_id: int | None = None, prefix_caching: bool = True) -> None:
        cfg = model.cfg
        if num_blocks is None:  # four full contexts, unless told
            num_blocks = 4 * math.ceil(cfg.context_length / block_size) \
                if isinstance(block_size, int) and block_size > 0 else 0
        p = next(model.parameters())
        self.model, self.eos_id, self.prefix_caching = model, eos_id, prefix_caching
        heads = getattr(cfg, "n_kv_heads", cfg.n_heads)
        self.pool = BlockPool(cfg.n_layers, heads, cfg.head_dim, block_size, num_blocks,
                              p.dtype, p.device)
        self.caches = [PagedCache(self.pool, i) for i in range(cfg.n_layers)]
        self.requests: dict[int, Request] = {}
        self.clock = 0  # the next step's number
        self.history: list[StepRecord] = []
        self.prefill_seconds = 0.0  # time in prefill forwards (prefix hits make it shorter)
        self.decode_seconds = 0.0

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, ids: Tensor | list[int], max_new_tokens: int, arrival_step: int = 0
                    ) -> int:
        """Queue a request; returns its id. It joins at ``arrival_step`` or later."""
        if isinstance(ids, Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            check_token_ids(ids[None] if ids.dim() == 1 else ids, self.model.cfg.vocab_size)
            ids = ids.tolist()
        if not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError("a request's prompt must be a 1-D tensor or a list of token ids, "
                             "with at least one token")
        check_token_ids(torch.tensor([ids]), self.model.cfg.vocab_size)
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
            if self.pool.refs[r.blocks[i]] > 1:
                r.blocks[i] = self.pool.copy(r.blocks[i])

    def _finish(self, r: Request) -> None:
        for b in r.blocks:
            self.pool.release(b)
        r.blocks, r.state, r.finish_step = [], "finished", self.clock

    def _done(self, r: Request) -> bool:
        return len(r.output) >= r.max_new_tokens or (
            self.eos_id is not None and r.output[-1] == self.eos_id)

    @contextlib.contextmanager
    def _paged(self) -> Iterator[None]:
        """The model with the engine's paged caches in, for one forward; its own put back."""
        model = self.model
        layers, saved, pos = model.attention_layers, model.caches, model.pos
        for layer, cache in zip(layers, self.caches, strict=True):
            layer.kv_cache = cache
        try:
            with torch.inference_mode():
                yield
        finally:
            for layer, cache in zip(layers, saved, strict=True):
                layer.kv_cache = cache
            model.pos = pos

    def _forward(self, rows: list[Request], ids: Tensor, starts: list[int]) -> Tensor:
        """Greedy next tokens ``(B,)`` for ``ids`` ``(B, T)``, row b continuing at ``starts[b]``."""
        self.pool.set_batch([r.blocks for r in rows], starts, ids.shape[1])
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
                start = time.perf_counter()
                self._writable(r, len(r.prompt))
                ids = torch.tensor([r.prompt[r.cached_tokens :]], device=self.pool.keys.device)
                r.output.append(int(self._forward([r], ids, [r.cached_tokens])[0]))
                self.prefill_seconds += time.perf_counter() - start
                self._register_prompt(r)
                running.append(r)
                joined.append(r.id)
            if decoding:
                start = time.perf_counter()
                for r in decoding:
                    self._writable(r, r.length + 1)
                ids = torch.tensor([[r.output[-1]] for r in decoding],
                                   device=self.pool.keys.device)  # (B, 1)
                nxt = self._forward(decoding, ids, [r.length for r in decoding])
                for r, t in zip(decoding, nxt.tolist(), strict=True):
                    r.output.append(t)
                self.decode_seconds += time.perf_counter() - start
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

        total = sum(r.max_new_tokens - len(r.output) for r in self.requests.values())
        with tqdm(total=total, desc="engine", unit="tok", disable=not progress) as bar:
            while self.pending:
                before = sum(len(r.output) for r in self.requests.values())
                self.step()
                bar.update(sum(len(r.output) for r in self.requests.values()) - before)
        return {rid: self.result(rid) for rid in self.requests}

    # ---- accounting -----------------------------------------------------------------------
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
        per_token = pool.block_nbytes // bs
        return {
            "blocks_total": pool.num_blocks,
            "blocks_used": len(used),
            "blocks_shared": sum(pool.refs[b] > 1 for b in used),
            "blocks_cached": sum(b in pool.prefix_of for b in pool.free),
            "bytes_reserved": len(used) * pool.block_nbytes,
            "bytes_used": sum(filled.values()) * per_token,
            "prefix_hit_tokens": sum(r.cached_tokens for r in self.requests.values()),
        }
