"""Serving many requests at once: a paged KV cache with prefix sharing, and continuous batching.

A server does not know how long an answer will be. Reserving a contiguous cache for the longest
possible request wastes most of it (the vLLM paper measured 60-80% of KV memory in systems that
did). Paging cuts the cache into **blocks** of ``block_size`` tokens, the way an operating system
cuts memory into pages:

- ``BlockPool`` (``pool.py``) keeps the books of ``num_blocks`` blocks: it hands out free
  blocks on demand and takes them back when a request ends. A request's **block table** lists its
  blocks in order: token ``t`` lives in block ``table[t // block_size]``, slot
  ``t % block_size``. Only a request's last block is partly empty, so the waste is under one
  block per request.
- Blocks carry **reference counts**, so requests can share them. A prompt's full blocks are
  registered under a hash of their tokens and of every token before them (the **prefix**): a new
  request whose prompt starts with the same blocks takes them instead of computing them again
  (**prefix caching**). A block whose count drops to 0 is free again but keeps its contents
  until it is handed out, so a later request may still find it. A request that must write into a
  block that others also use gets its own copy first (**copy-on-write**; ``Engine.fork``): the
  pool gives it a new block id, the storage copies the keys and values.
- What attention reads lives with the other caches, in ``kvlib.caches.paged``: ``BlockStorage``
  holds every layer's keys and values under the pool's block ids, ``PagedBatch`` the next
  forward's tables, positions and slots, and ``PagedCache`` is one layer's view of both.
  Attention gathers a batch's blocks into one ``(B, H, blocks * block_size, D)`` tensor per step
  (see ``PagedCache.update`` for why). The pool holds no tensors. One prompt, or a batch of
  equal length, needs no engine: ``kvlib.generate(model, ids, n, cache="paged", block_size=16)``.
- ``Engine`` runs requests with **continuous batching**: at every step, requests that have
  arrived join as soon as the pool can promise them every block they may need, each request gets
  one new token, and a finished request leaves at once and frees its blocks for the next
  (``engine.py``; the block keeping is ``books.py``, a request and a step's record
  ``request.py``).

Each request draws its tokens its own way: greedy (the default), sampled with its own seeded
generator (so its tokens do not depend on what else is in the batch), or as a beam search. Three
things vLLM's scheduler does beyond that, the first two by sharing blocks within one request's
family of rows:

- ``Engine.fork(request_id, n, seed)``: ``n`` samples of one prompt, which is computed and stored
  once; each sample writes its own tokens into its own blocks from the first block they part in.
- ``add_request(..., num_beams=k)``: the ``k`` beams are rows whose block tables are copied from
  the beam they continue, every step (``beams.py``): the prompt and the hypotheses' common start
  are stored once, and a copy is made only of a last, partly filled block that two beams write.
- ``Engine(max_batched_tokens=N)``: each step computes at most ``N`` tokens, decodes first, and a
  long prompt is prefilled in chunks over several steps instead of stalling the running requests.

The tests check that every request gets exactly the tokens it gets alone (greedy, or sampled with
the same seed), and that a beam search gives transformers' beams.
"""

from ..caches.paged import BlockStorage, PagedBatch, PagedCache
from .beams import continue_beams, select_beams
from .engine import Engine
from .pool import BlockPool
from .request import Request, StepRecord

__all__ = ["BlockPool", "BlockStorage", "Engine", "PagedBatch", "PagedCache", "Request",
           "StepRecord", "continue_beams", "select_beams"]
