"""Continuous batching over a paged cache (see ``kvlib.serving``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..caches.paged import BlockStorage, PagedBatch, PagedCache, index_tensor
from ..models import CausalLM, check_token_ids
from ..sampling import greedy
from ..timing import Stopwatch
from .beams import continue_beams, select_beams
from .books import BUDGET_FIX, Books
from .pool import BlockPool
from .request import Request, StepRecord, check_sampling, new_generator


class Engine(Books):
    """Continuous batching over a paged cache, each request greedy, sampled or a beam search.

    ``add_request(ids, max_new_tokens, arrival_step, temperature, top_k, seed, num_beams)``
    queues a request; ``fork(request_id, n, seed)`` gives a request ``n`` siblings that share
    its blocks (parallel sampling); ``step()`` advances the clock by one step: every request
    already decoding decodes one token, all of them in one batched forward, and prompts are
    prefilled: requests that have arrived join (first come, first served) while the pool can
    promise each the blocks it may need, and each runs the part of its prompt not found in the
    pool. ``run()`` steps until every request is done and returns ``{request id: prompt +
    output}``. ``stats`` counts blocks and bytes.

    ``max_batched_tokens`` (vLLM's ``max_num_batched_tokens``) caps the tokens a step computes:
    decodes first, one token for each running row, then prompt chunks with what is left, so a
    long prompt is split over several steps instead of stalling every running request for a
    whole step (**chunked prefill**). ``None`` (the default): every prompt in one go.

    Three pieces hold the state: ``pool`` (a ``BlockPool``: the books, which blocks are free,
    shared, findable by prefix), ``storage`` (a ``BlockStorage``: every layer's keys and values,
    under the same block ids) and ``batch`` (a ``PagedBatch``: the tables, positions and slots of
    the next forward), which ``caches``, one ``PagedCache`` per layer, read. The model keeps its
    own caches: the engine puts its paged views in for its forwards only.
    """

    def __init__(self, model: CausalLM, block_size: int = 16, num_blocks: int | None = None,
                 eos_id: int | None = None, prefix_caching: bool = True,
                 max_batched_tokens: int | None = None) -> None:
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
        if max_batched_tokens is not None and (not isinstance(max_batched_tokens, int)
                                               or max_batched_tokens < 1):
            raise ValueError(f"max_batched_tokens must be a positive number of tokens per step "
                             f"(or None: no budget), got {max_batched_tokens!r}")
        p = next(model.parameters())
        self.model, self.eos_id, self.prefix_caching = model, eos_id, prefix_caching
        self.max_batched_tokens = max_batched_tokens
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
        self.mixed_seconds = 0.0  # time in forwards of decodes and prompt chunks together

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, ids: Tensor | list[int], max_new_tokens: int, arrival_step: int = 0,
                    temperature: float = 0.0, top_k: int | None = None,
                    seed: int | None = None, num_beams: int = 1) -> int:
        """Queue a request; returns its id. It joins at ``arrival_step`` or later.

        Greedy by default; ``temperature > 0`` samples (from the ``top_k`` most likely tokens if
        given) with the request's own generator, seeded by ``seed``: the request gets the tokens
        ``kvlib.generate(model, ids, max_new_tokens, temperature=..., top_k=..., seed=...)``
        gives, whatever else is in the batch. ``num_beams=k`` runs a beam search of ``k`` rows
        whose best hypothesis is this request's output (``beams(id)``: all ``k``)."""
        prompt = self._prompt(ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if arrival_step < 0:
            raise ValueError(f"arrival_step must be >= 0, got {arrival_step}")
        check_sampling(temperature, top_k)
        self._check_beams(num_beams, temperature)
        rows = [Request(len(self.requests) + i, prompt, max_new_tokens, arrival_step,
                        temperature, top_k) for i in range(num_beams)]
        self._check_fits(rows, shared=len(prompt) // self.pool.block_size)
        head = rows[0]
        for r in rows:
            if num_beams > 1:  # the other rows start with the first, when its prompt is done
                r.beam_of, r.joins = head.id, None if r is head else head.id
            elif temperature > 0:
                r.seed, r.generator = new_generator(seed, self.device)
            self.requests[r.id] = r
        return head.id

    def fork(self, request_id: int, n: int = 1, seed: int | None = None,
             max_new_tokens: int | None = None) -> list[int]:
        """``n`` new requests that continue ``request_id`` from where it is now, sharing all of
        its blocks (parallel sampling, vLLM's ``n``); returns their ids. Child ``i`` draws with
        seed ``seed + i`` (none given: seeds drawn from torch's generator) at the parent's
        temperature and top-k. Forked before it starts, a request and its children run the
        prompt once and each takes its own first token from it: child ``i`` gets the tokens
        ``generate(..., seed=seed + i)`` gives. Forked while it runs, the children share its
        output so far too. The first write into a shared block copies it (copy-on-write)."""
        parent = self._get(request_id)
        self._check_fork(parent, n)
        head = self.requests[parent.joins] if parent.joins is not None else parent
        new = max_new_tokens or parent.max_new_tokens
        if new <= len(parent.output):
            raise ValueError(f"request {request_id} already has {len(parent.output)} tokens: "
                             f"a fork needs max_new_tokens above that, got {new}")
        kids = []
        for i in range(n):
            kid = Request(len(self.requests) + i, list(parent.prompt), new, self.clock,
                          parent.temperature, parent.top_k)
            if parent.temperature > 0:
                kid.seed, kid.generator = new_generator(
                    None if seed is None else seed + i, self.device)
            kids.append(kid)
        running, bs = parent.state == "running", self.pool.block_size
        if running:  # they share the blocks before the one it writes into next, for good
            self._check_fits([parent, *kids], parent.length // bs)
        else:  # they will share the prompt's full blocks, with the rows already waiting
            waiting = [q for q in self.requests.values() if q.joins == head.id]
            self._check_fits([head, *waiting, *kids], len(head.prompt) // bs)
        for kid in kids:
            if running:  # the same tokens and blocks as the parent, from now on its own
                kid.output, kid.computed, kid.blocks = list(parent.output), parent.computed, \
                    list(parent.blocks)
                kid.state, kid.first_step = "running", self.clock
                for b in kid.blocks:
                    self.pool.share(b)
            else:  # waits for the parent's prompt, then shares its blocks
                kid.joins = head.id
            self.requests[kid.id] = kid
        self._check_room(request_id, kids)
        return [kid.id for kid in kids]

    def result(self, request_id: int) -> Tensor:
        """Prompt and output of a request so far, as a 1-D tensor (a beam search: its best)."""
        return torch.tensor(self._get(request_id).tokens)

    def beams(self, request_id: int) -> list[Tensor]:
        """Every hypothesis of a beam search, best first (prompt + output, 1-D tensors); their
        cumulative log-probabilities are the rows' ``score``."""
        r = self._get(request_id)
        if r.beam_of != request_id:
            raise ValueError(f"request {request_id} is not a beam search: add it with "
                             "add_request(..., num_beams=k)")
        return [self.result(q.id) for q in self._beam_rows(r)]

    def _get(self, request_id: int) -> Request:
        if request_id not in self.requests:
            raise KeyError(f"unknown request id {request_id!r}; the engine has ids "
                           f"0..{len(self.requests) - 1} (add_request returns them)")
        return self.requests[request_id]

    def _prompt(self, ids: Tensor | list[int]) -> list[int]:
        prompt = ids if isinstance(ids, Tensor) else torch.tensor(ids)
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError("a request's prompt must be a 1-D tensor or a list of token ids, "
                             "with at least one token")
        check_token_ids(prompt[None], self.model.cfg.vocab_size)
        return prompt.tolist()

    def _beam_rows(self, head: Request) -> list[Request]:
        return [q for q in self.requests.values() if q.beam_of == head.id]

    # ---- the step -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _paged(self) -> Iterator[None]:
        """The model with the engine's paged caches in, for one step; its own put back."""
        with self.model.using(self.caches), torch.inference_mode():
            yield

    def _forward(self, rows: list[Request], ids: Tensor, starts: list[int]) -> Tensor:
        """Last-position logits ``(B, vocab)`` for ``ids`` ``(B, T)``, row b continuing at
        ``starts[b]``."""
        self.batch.set([r.blocks for r in rows], starts, ids.shape[1], self.device)
        return self.model(ids, use_cache=True, last_only=True, check_ids=False)[:, -1]

    def step(self) -> StepRecord:
        """Advance one step: prompts are prefilled (arrivals join while the pool can promise
        them their blocks; under a token budget, in chunks of what the decodes leave), then
        every row that was already running decodes one token, all of them in one forward."""
        decoding = [r for r in self.requests.values() if r.state == "running"]
        with Stopwatch(self.device) as sw, self._paged():
            if self.max_batched_tokens is None:  # each prompt, then the decodes
                chunks, joined, waiting = self._prefill(math.inf)
                self._decode(decoding)
            else:  # the decodes and the prompt chunks that fit, in one forward
                chunks, joined, waiting = self._mixed(decoding)
        finished = []
        for r in decoding + [self.requests[i] for i in joined]:
            if self._done(r):
                self._finish(r)
                finished.append(r.id)
        held = [r for r in self.requests.values() if r.state in ("prefilling", "running")]
        record = StepRecord(
            self.clock, {r.id: list(r.blocks) for r in held}, list(self.pool.refs), joined,
            finished, waiting, {r.id: r.length for r in held}, self.stats,
            [r.id for r in decoding], chunks, sw.seconds)
        self.history.append(record)
        self.clock += 1
        return record

    def _budget(self, decodes: int) -> float:
        """Prompt tokens this step may run: what the budget leaves after one token per decode."""
        if self.max_batched_tokens is None:
            return math.inf
        left = self.max_batched_tokens - decodes
        if left < 0:  # the engine never starts more rows than the budget holds
            raise RuntimeError(f"{decodes} rows decode a token each but max_batched_tokens="
                               f"{self.max_batched_tokens}: {BUDGET_FIX}")
        return left

    def _prefill(self, budget: float, run: bool = True
                 ) -> tuple[dict[int, int], list[int], list[int]]:
        """Run prompts within ``budget`` tokens: first the prompts already started, then the
        arrivals, first come first served (one that cannot start holds back those behind it).
        Each chunk runs in a forward of its own, right away, so that a request arriving in the
        same step finds its full blocks; with ``run=False`` the chunks only get their blocks
        (and their full ones are findable), for ``_mixed`` to run. Returns the chunks ``{request
        id: tokens}``, the rows that joined (their prompt done) and the arrivals left
        waiting."""
        chunks, joined, waiting = {}, [], []
        started = [r for r in self.requests.values() if r.state == "prefilling"]
        arrived = [r for r in self.requests.values() if r.state == "waiting"
                   and r.joins is None and r.arrival_step <= self.clock]
        with Stopwatch(self.device) as sw:
            for r in started + arrived:
                if r.state == "waiting" and (waiting or budget < 1 or not self._admit(r)):
                    waiting.append(r.id)  # no overtaking: later arrivals wait behind it
                    continue
                take = int(min(len(r.prompt) - r.computed, budget))
                if take < 1:
                    continue
                budget -= take
                chunks[r.id] = take
                start = self._claim_chunk(r, take)
                if run:
                    joined += self._run_chunk(r, start)
        if run:
            self.prefill_seconds += sw.seconds
        return chunks, joined, waiting

    def _mixed(self, rows: list[Request]) -> tuple[dict[int, int], list[int], list[int]]:
        """Under a token budget, the step's one forward (vLLM's mixed batch): a token for each
        decoding row, then the prompt chunks the budget leaves room for, packed into one row
        ``(1, N)``, each token seeing only its own request's blocks (``PagedBatch.set_packed``).
        A request that starts in this step may share the full blocks of a chunk in the same
        forward: every layer writes the new keys before any token reads them. Returns what
        ``_prefill`` returns."""
        chunks, _, waiting = self._prefill(self._budget(len(rows)), run=False)
        if not chunks:  # decodes alone: the batch of rows, each reading its own blocks
            self._decode(rows)
            return chunks, [], waiting
        for r in rows:
            self._writable(r, r.length + 1)
        prompts = [self.requests[i] for i in chunks]
        with Stopwatch(self.device) as sw:
            runs = [[r.output[-1]] for r in rows] + [
                r.prompt[r.computed - chunks[r.id] : r.computed] for r in prompts]
            starts = [r.length for r in rows] + [r.computed - chunks[r.id] for r in prompts]
            last = self.batch.set_packed([r.blocks for r in rows + prompts], starts,
                                         [len(t) for t in runs], self.device)
            ids = torch.tensor([[t for run in runs for t in run]], device=self.device)  # (1, N)
            at = torch.tensor(last, device=self.device)  # each request's last token
            logits = self.model(ids, use_cache=True, check_ids=False, logits_at=at)[0]
            joined = []
            for j, r in enumerate(prompts, start=len(rows)):
                if r.computed == len(r.prompt):
                    joined += self._join(r, logits[j : j + 1])
            self._pick(rows, logits[: len(rows)])
        self.mixed_seconds += sw.seconds
        return chunks, joined, waiting

    def _claim_chunk(self, r: Request, take: int) -> int:
        """Give the next ``take`` prompt tokens of ``r`` their blocks and count them computed,
        its full blocks findable by requests arriving after (the forward that computes them
        runs before any later forward reads them); where the chunk starts."""
        start = r.computed
        self._writable(r, start + take)
        r.computed += take
        self._register_prompt(r)
        return start

    def _run_chunk(self, r: Request, start: int) -> list[int]:
        """The claimed chunk of ``r`` from ``start`` in one forward ``(1, take)``; if that was
        the last of its prompt, it joins (``_join``). Returns the rows that joined."""
        ids = torch.tensor([r.prompt[start : r.computed]], device=self.device)
        logits = self._forward([r], ids, [start])  # (1, vocab)
        return self._join(r, logits) if r.computed == len(r.prompt) else []

    def _decode(self, rows: list[Request]) -> None:
        """One token for each row, in one forward ``(B, 1)``; a beam search's rows then choose
        their next beams together."""
        if not rows:
            return
        with Stopwatch(self.device) as sw:
            for r in rows:
                self._writable(r, r.length + 1)
            ids = index_tensor([r.output[-1] for r in rows], self.device)[:, None]  # (B, 1)
            logits = self._forward(rows, ids, [r.length for r in rows])  # (B, vocab)
            self._pick(rows, logits)
        self.decode_seconds += sw.seconds

    def _pick(self, rows: list[Request], logits: Tensor) -> None:
        """Each row's next token from its ``logits`` ``(B, vocab)``; a beam search's rows choose
        their next beams together."""
        searches: dict[int, list[int]] = {}  # a beam search's id -> its rows in the batch
        greedy_rows = any(r.beam_of is None and r.temperature == 0.0 for r in rows)
        top = greedy(logits)[:, 0].tolist() if greedy_rows else []  # all at once, not per row
        for b, r in enumerate(rows):
            if r.beam_of is not None:
                searches.setdefault(r.beam_of, []).append(b)
            elif r.temperature == 0.0:
                r.output.append(top[b])  # what next_token gives at temperature 0
            else:
                r.output.append(r.next_token(logits[b : b + 1]))
        for at in searches.values():
            beam = [rows[b] for b in at]
            scores = torch.tensor([r.score for r in beam], device=self.device)
            continue_beams(self.pool, beam, *select_beams(logits[at], scores, len(beam)))

    def _join(self, head: Request, logits: Tensor) -> list[int]:
        """``head``'s prompt is in the pool: start it and every row waiting for it, each with
        its first token from the prompt's ``logits`` ``(1, vocab)`` and all of ``head``'s
        blocks, shared (a beam search: its first ``k`` beams)."""
        family = [head] + [q for q in self.requests.values() if q.joins == head.id]
        for q in family:
            q.state, q.joins, q.computed = "running", None, head.computed
            q.first_step = self.clock if q.first_step is None else q.first_step
        if head.beam_of is not None:  # the first step expands the prompt's beam alone
            zero = torch.zeros(1, device=self.device)
            continue_beams(self.pool, family, *select_beams(logits, zero, len(family)))
            return [q.id for q in family]
        for q in family[1:]:
            q.blocks = list(head.blocks)
            for b in q.blocks:
                self.pool.share(b)
        for q in family:
            q.output.append(q.next_token(logits))
        return [q.id for q in family]

    def _done(self, r: Request) -> bool:
        return len(r.output) >= r.max_new_tokens or (
            self.eos_id is not None and r.output[-1] == self.eos_id)

    def _finish(self, r: Request) -> None:
        for b in r.blocks:
            self.pool.release(b)
        r.blocks, r.state, r.finish_step = [], "finished", self.clock

    @property
    def pending(self) -> bool:
        return any(r.state != "finished" for r in self.requests.values())

    def run(self, progress: bool = False) -> dict[int, Tensor]:
        """Step until every request has finished; ``{request id: prompt + output}`` (a beam
        search once, by the id ``add_request`` gave: its best hypothesis)."""
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
        return {rid: self.result(rid) for rid, r in self.requests.items()
                if r.beam_of in (None, rid)}
