"""The paged strategy: one layer's keys and values in the blocks of a pool shared by all layers.

The pool (``kvlib.serving.BlockPool``) owns the storage and the bookkeeping; ``PagedCache`` is one
layer's view of it, which the engine plugs into the model for its forwards (``model.using``).
"""

from __future__ import annotations

from torch import Tensor

from .base import KVCache


class PagedCache(KVCache):
    """One layer's keys and values, kept in the blocks of a shared ``BlockPool``.

    The engine sets the batch (``pool.set_batch``: tables, positions, slots, mask) before each
    forward; every row may hold a different number of tokens. ``update`` writes the new tokens
    into their slots and returns the batch's blocks gathered into
    ``(B, H, blocks * block_size, D)``; ``batch_mask`` hides each row's empty slots and future
    tokens.

    Why gather: PyTorch has no attention kernel that reads keys through a block table (vLLM and
    FlashInfer write their own, which read each block where it lies). The gather is one copy of
    the batch's live blocks per layer per step, the same bytes attention reads anyway, and then
    the ordinary fused ``scaled_dot_product_attention`` runs on it. ``python -m kvlib.bench
    serving`` measures what it costs against a contiguous cache.
    """

    name = "paged"

    def __init__(self, pool, layer: int) -> None:  # pool: a kvlib.serving.BlockPool
        super().__init__()
        self.pool, self.layer = pool, layer

    @property
    def capacity(self) -> int | None:
        return self.pool.num_blocks * self.pool.block_size

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes // self.pool.keys.shape[0]  # this layer's share of the pool

    def next_positions(self, T: int) -> Tensor:
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
