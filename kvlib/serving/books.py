"""The engine's block keeping: who may start, what the pool has promised, copy-on-write, and
the counts (``Engine`` is a ``Books``; see ``kvlib.serving``).

The rule that keeps every request safe: a request starts only when the pool can **promise** it
every block it may still need, on top of what it has promised the requests already running. So
no request ever has to stop half-way for want of a block. With sharing, what a request may still
take from the free list is the blocks it has yet to grow by, plus the copies that copy-on-write
will make of shared blocks it is about to write into.
"""

from __future__ import annotations

from ..caches.paged import BlockStorage
from ..models import CausalLM
from .pool import BlockPool
from .request import Request, StepRecord

BUDGET_FIX = "make Engine(max_batched_tokens=...) larger or None"


class Books:
    """Mixed into ``Engine``: the methods that keep a request's blocks."""

    model: CausalLM
    pool: BlockPool
    storage: BlockStorage
    requests: dict[int, Request]
    history: list[StepRecord]
    max_batched_tokens: int | None
    prefix_caching: bool
    eos_id: int | None
    clock: int

    # ---- promises -------------------------------------------------------------------------
    def _most_blocks(self, r: Request) -> int:
        """The most blocks a request's table can ever list."""
        return self.pool.blocks_for(r.most_tokens)

    def _promised(self) -> int:
        """Blocks the started requests may still take from the free list: each one's growth (a
        row waiting to join a prompt that is being prefilled will share its full blocks), and
        the copies that copy-on-write still owes."""
        bs, total = self.pool.block_size, 0
        for r in self.requests.values():
            if r.state in ("prefilling", "running"):
                total += self._most_blocks(r) - len(r.blocks)
            elif r.joins is not None and self.requests[r.joins].state == "prefilling":
                total += self._most_blocks(r) - len(r.prompt) // bs
        return total + self._copies_owed()

    def _copies_owed(self) -> int:
        """Copies that copy-on-write will still make: for each shared block, one for every row
        that will write its next token into it, less one when those rows hold all of the block's
        references (the last of them finds it unshared and writes in place)."""
        writers: dict[int, int] = {}
        for r in self.requests.values():
            i = r.length // self.pool.block_size  # the block its next token goes into
            if r.state == "running" and i < len(r.blocks) and self.pool.refs[r.blocks[i]] > 1:
                writers[r.blocks[i]] = writers.get(r.blocks[i], 0) + 1
        return sum(w - (w == self.pool.refs[b]) for b, w in writers.items())

    def _rows_started(self) -> int:
        """Rows in the batch or on their way (prefilling, with the rows that wait to join)."""
        return sum(r.state in ("prefilling", "running") or (
            r.joins is not None and self.requests[r.joins].state == "prefilling")
            for r in self.requests.values())

    # ---- starting a request ---------------------------------------------------------------
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

    def _admit(self, r: Request) -> bool:
        """Start ``r`` (and the rows waiting to join it) if the pool can promise them every
        block they may need and, under a token budget, the batch has a row for each of them."""
        family = [r] + [q for q in self.requests.values() if q.joins == r.id]
        budget = self.max_batched_tokens
        if budget is not None and self._rows_started() + len(family) > budget:
            return False  # each row will decode a token every step: they must fit the budget
        hits = self._prefix_hits(r)
        full = len(r.prompt) // self.pool.block_size  # the others share the full prompt blocks
        need = self._most_blocks(r) - len(hits) + sum(self._most_blocks(q) - full
                                                      for q in family[1:])
        free = len(self.pool.free) - sum(self.pool.refs[b] == 0 for b in hits)
        if need > free - self._promised():
            return False
        for b in hits:
            self.pool.share(b)
        r.blocks, r.cached_tokens = list(hits), len(hits) * self.pool.block_size
        r.computed, r.state, r.first_step = r.cached_tokens, "prefilling", self.clock
        return True

    def _register_prompt(self, r: Request) -> None:
        """Make the prompt's full blocks computed so far findable by later requests."""
        bs, parent = self.pool.block_size, 0
        for i in range(min(r.computed, len(r.prompt)) // bs):
            tokens = tuple(r.prompt[i * bs : (i + 1) * bs])
            parent = self.pool.register(r.blocks[i], parent, tokens)

    def _writable(self, r: Request, upto: int) -> None:
        """Give ``r`` blocks for its tokens below ``upto``: new ones as needed, and its own copy
        of a shared block it is about to write into."""
        bs = self.pool.block_size
        while len(r.blocks) < self.pool.blocks_for(upto):
            r.blocks.append(self.pool.allocate())
        for i in range(r.length // bs, len(r.blocks)):
            shared = r.blocks[i]
            if self.pool.refs[shared] > 1:  # copy-on-write: the books, then the tensors
                r.blocks[i] = self.pool.copy_on_write(shared)
                self.storage.copy(shared, r.blocks[i])

    # ---- what can never run, and what cannot run now --------------------------------------
    def _check_fits(self, rows: list[Request], shared: int) -> None:
        """Refuse rows that could never run together, even in an empty pool: they share their
        first ``shared`` blocks and may each fill the rest of their own table."""
        most = shared + sum(self._most_blocks(r) - shared for r in rows)
        bs, n = self.pool.block_size, self.pool.num_blocks
        if most > n and len(rows) == 1:
            raise ValueError(
                f"this request needs up to {rows[0].most_tokens} tokens = {most} blocks of {bs}, "
                f"but the pool has {n} blocks in all: it can never run. Make the pool larger "
                "(Engine(num_blocks=...)) or ask for fewer tokens")
        if most > n:
            fit = (n - shared) // max(self._most_blocks(rows[0]) - shared, 1)
            raise ValueError(
                f"these {len(rows)} rows (a request and the forks or beams that share its "
                f"blocks) may need up to {most} blocks of {bs} tokens (the {shared} they share "
                f"once, the rest for each row), but the pool has {n} blocks in all: they can "
                f"never run. Ask for fewer rows (at most {fit} fit) or make the pool larger "
                "(Engine(num_blocks=...))")
        budget = self.max_batched_tokens
        if budget is not None and len(rows) > budget:
            raise ValueError(f"{len(rows)} rows would decode {len(rows)} tokens every step, more "
                             f"than max_batched_tokens={budget}: ask for at most {budget} rows "
                             f"or {BUDGET_FIX}")
        ctx = self.model.cfg.context_length
        r = max(rows, key=lambda q: q.most_tokens)
        if self.model.hard_context and r.most_tokens > ctx:
            raise ValueError(f"prompt + max_new_tokens - 1 = {r.most_tokens} positions, but the "
                             f"model has {ctx}: ask for at most {ctx - len(r.prompt) + 1} new "
                             "tokens")

    def _check_room(self, request_id: int, kids: list[Request]) -> None:
        """After a fork of a started request: undo it if the pool (or the token budget) can no
        longer promise every started row what it may need."""
        budget = self.max_batched_tokens
        short = len(self.pool.free) < self._promised()
        if not short and (budget is None or self._rows_started() <= budget):
            return
        for kid in kids:
            for b in kid.blocks:
                self.pool.release(b)
            del self.requests[kid.id]
        why = "the pool cannot promise the forks their blocks" if short else \
            f"the batch would decode more than max_batched_tokens={budget} tokens a step"
        raise RuntimeError(f"no room to fork request {request_id} now: {why}; fork fewer or "
                           "later, or make the pool larger (Engine(num_blocks=...))"
                           + ("" if short else f" or {BUDGET_FIX}"))

    def _check_fork(self, parent: Request, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive number of forks, got {n!r}")
        if parent.state == "finished":
            raise ValueError(
                f"request {parent.id} has finished and its blocks are back in the pool: fork a "
                "request while it waits or runs (right after add_request, to share its prompt), "
                f"or add a new request with its tokens (engine.result({parent.id}))")
        if parent.beam_of is not None:
            raise ValueError(f"request {parent.id} is a beam search, whose rows change "
                             "hypotheses every step: fork a request added without num_beams")

    def _check_beams(self, num_beams: int, temperature: float) -> None:
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
        if num_beams > 1 and temperature > 0:
            raise ValueError("beam search here is deterministic (transformers' do_sample=False): "
                             "for several sampled answers use fork(request_id, n, seed=...)")
        if num_beams > 1 and self.eos_id is not None:
            raise ValueError("beam search here runs every beam to max_new_tokens, with no eos: "
                             "use an Engine made with eos_id=None for beam search")

    # ---- counts ---------------------------------------------------------------------------
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
        by more than one), ``blocks_unshared`` (what the started requests would hold if nothing
        were shared: every table's blocks, a shared one counted for each), ``blocks_cached``
        (free, but still findable by prefix), ``bytes_reserved`` (the used blocks) and
        ``bytes_used`` (their filled slots)."""
        pool, bs = self.pool, self.pool.block_size
        used = [b for b in range(pool.num_blocks) if pool.refs[b] > 0]
        filled: dict[int, int] = {}
        tables = 0
        for r in self.requests.values():
            if r.state not in ("prefilling", "running"):
                continue
            tables += len(r.blocks)
            for i, b in enumerate(r.blocks):
                filled[b] = max(filled.get(b, 0), min(bs, r.length - i * bs))
        per_token = self.storage.block_nbytes // bs
        return {
            "blocks_total": pool.num_blocks,
            "blocks_used": len(used),
            "blocks_shared": sum(pool.refs[b] > 1 for b in used),
            "blocks_unshared": tables,
            "blocks_cached": sum(b in pool.prefix_of for b in pool.free),
            "bytes_reserved": len(used) * self.storage.block_nbytes,
            "bytes_used": sum(filled.values()) * per_token,
            "prefix_hit_tokens": sum(r.cached_tokens for r in self.requests.values()),
        }
