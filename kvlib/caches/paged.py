"""The paged strategy: keys and values in blocks of one storage that every layer shares.

What attention reads, in three small pieces:

- ``BlockStorage``: the tensors, every layer's keys and values for ``num_blocks`` blocks of
  ``block_size`` tokens, ``(layers, blocks, block_size, kv_heads, head_dim)``; nothing else.
- ``PagedBatch``: the batch the next forward computes (each row's block table, its new tokens'
  positions and slots, the mask), set once per forward and read by every layer; vLLM calls it
  the attention metadata (block tables, slot mapping).
- ``PagedCache``: one layer's view: it writes the new keys and values into their slots and
  gathers the batch's blocks for attention.

Who hands out blocks is not here. The engine keeps the books (``kvlib.serving.BlockPool``:
reference counts, prefix hashes, the free queue) and sets the batch of each forward, rows of any
lengths. With no engine around (``cache="paged"``) a ``RowPager`` does it for a batch whose rows
all hold the same tokens: each row takes the next unused block when it needs one, and nothing is
shared or freed until the next text.
"""

from __future__ import annotations

import array
import math

import torch
from torch import Tensor

from .base import KVCache, LayerSpec, Traits
from .paged_kernel import decode_kernel


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive number of tokens, got {block_size!r}"
                         " (vLLM uses 16)")


def check_num_blocks(num_blocks: int) -> None:
    if not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")


def index_tensor(values: list[int], device: torch.device | str) -> Tensor:
    """Python ints as an int64 tensor ``(len(values),)``. ``torch.tensor`` converts a list one
    int at a time (14 µs for the 120 block numbers of a decode step at batch 8); through an
    ``array`` it is one copy (2 µs), and the engine builds a few of these every step."""
    if not values:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64).to(device)


class BlockStorage:
    """Keys and values of every layer for ``num_blocks`` blocks of ``block_size`` tokens. Slot
    ``s`` of the storage seen as one run of ``num_blocks * block_size`` slots is slot
    ``s % block_size`` of block ``s // block_size``. Without ``num_blocks`` the tensors are
    made by the first ``allocate``."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        check_block_size(block_size)
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.block_size = block_size
        self.keys: Tensor | None = None  # (L, N, bs, H, D)
        self.values: Tensor | None = None
        if num_blocks is not None:
            self.allocate(num_blocks, dtype, device)

    def allocate(self, num_blocks: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Tensors for ``num_blocks`` blocks, kept if they already are those (same dtype,
        device, and made in or out of ``torch.inference_mode`` alike: ``generate`` runs in it,
        and a tensor made there cannot be written outside it)."""
        check_num_blocks(num_blocks)
        shape = (self.n_layers, num_blocks, self.block_size, self.n_kv_heads, self.head_dim)
        held = self.keys
        if held is not None and held.shape == shape and held.dtype == dtype \
                and held.device == torch.device(device) \
                and held.is_inference() == torch.is_inference_mode_enabled():
            return
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block: keys and values of every layer."""
        return 0 if self.keys is None else 2 * self.keys[:, 0].numel() * self.keys.element_size()

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def copy(self, src: int, dst: int) -> None:
        """Block ``dst`` gets the keys and values of block ``src``, in every layer (the copy of
        copy-on-write; the books that decide it are the engine's ``BlockPool``)."""
        self.keys[:, dst] = self.keys[:, src]
        self.values[:, dst] = self.values[:, src]


class PagedBatch:
    """The batch the next forward computes, set once by ``set`` and read by every layer."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.tables: Tensor | None = None  # (B, n): each row's block table, padded with block 0
        self.positions: Tensor | None = None  # (B, T): the new tokens' positions in their rows
        self.write_at: Tensor | None = None  # (B * T,): each new token's slot in the storage
        self.lengths: Tensor | None = None  # (B,): each row's tokens after this forward
        self._mask: Tensor | None = None  # (B, 1, T, n * block_size): what each query may see

    def set(self, tables: list[list[int]], starts: list[int], T: int,
            device: torch.device | str) -> None:
        """The next forward: row b, with block table ``tables[b]``, holds ``starts[b]`` tokens
        and brings ``T`` new ones. Everything the layers need is computed here, once per forward,
        not once per layer."""
        B, n, bs = len(tables), max(len(t) for t in tables), self.block_size
        padded = [b for t in tables for b in t + [0] * (n - len(t))]
        self.tables = index_tensor(padded, device).view(B, n)
        rows = [range(s, s + T) for s in starts]  # each row's new positions
        self.positions = index_tensor([p for r in rows for p in r], device).view(B, T)
        self.write_at = index_tensor(  # each new token's block, and its slot in the block
            [t[p // bs] * bs + p % bs for t, r in zip(tables, rows, strict=True)
             for p in r], device)
        self.lengths = self.positions[:, -1] + 1
        self._mask = None  # made if a layer asks: the decode kernel reads lengths instead

    @property
    def mask(self) -> Tensor:
        """``(B, 1, T, S)``: which of the gathered keys' ``S`` slots each query may see."""
        if self._mask is None:
            slot = torch.arange(self.tables.shape[1] * self.block_size, device=self.tables.device)
            self._mask = slot <= self.positions[:, None, :, None]  # causal, in table order
        return self._mask

    def set_packed(self, tables: list[list[int]], starts: list[int], counts: list[int],
                   device: torch.device | str) -> list[int]:
        """The next forward as one packed row ``(1, N)``: request g, with block table
        ``tables[g]``, holds ``starts[g]`` tokens and brings ``counts[g]`` new ones, its tokens
        after those of the requests before it (vLLM's mixed batch: one token for each decode and
        a chunk of a prompt, in one forward). Every token sees its own request's slots up to its
        position and nothing of the others'. Returns where each request's last token is in the
        row."""
        bs = self.block_size
        table = torch.tensor([b for t in tables for b in t], device=device)  # every request's
        first = torch.tensor([0] + [len(t) * bs for t in tables], device=device).cumsum(0)
        count = torch.tensor(counts, device=device)
        owner = torch.repeat_interleave(torch.arange(len(tables), device=device), count)  # (N,)
        ends = count.cumsum(0)  # where each request's run of tokens ends in the row
        run = torch.arange(len(owner), device=device) - (ends - count)[owner]  # (N,) its index
        positions = torch.tensor(starts, device=device)[owner] + run  # (N,)
        at = first[owner] + positions  # its slot in the gathered keys
        self.tables = table[None]  # (1, n): one row of every request's blocks
        self.positions = positions[None]  # (1, N)
        self.write_at = table[at // bs] * bs + positions % bs  # (N,) the slot of the storage
        slot = torch.arange(len(table) * bs, device=device)
        self._mask = ((slot >= first[owner][:, None]) & (slot <= at[:, None]))[None, None]
        self.lengths = None  # one row of several requests: no decode kernel
        return (ends - 1).tolist()


class RowPager:
    """The block tables of a batch whose rows all hold the same tokens, when no engine is
    around: every row has ``blocks_per_row`` blocks of the storage to take from (``max_len``
    tokens), takes the next unused one when it needs one, and gives nothing back until the next
    text (the engine's ``BlockPool`` shares and frees). The view of layer 0 calls ``advance``
    once per forward, before it writes."""

    def __init__(self, storage: BlockStorage, batch: PagedBatch, max_len: int) -> None:
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive number of tokens, got {max_len!r}")
        self.storage, self.batch = storage, batch
        self.blocks_per_row = math.ceil(max_len / storage.block_size)
        self.tables: list[list[int]] = []  # each row's blocks
        self.handed_out = 0  # blocks taken since the text began: the next one to take

    @property
    def capacity(self) -> int:
        """Tokens each row can hold."""
        return self.blocks_per_row * self.storage.block_size

    def advance(self, keys: Tensor, start: int) -> None:
        """The batch of the forward that brings ``keys``' ``T`` tokens, every row at ``start``."""
        B, _, T, _ = keys.shape
        if start == 0:  # a new text: storage for every row, empty tables
            self.storage.allocate(B * self.blocks_per_row, keys.dtype, keys.device)
            self.tables, self.handed_out = [[] for _ in range(B)], 0
        elif B != len(self.tables):
            raise ValueError(f"the cache holds batch size {len(self.tables)} but got keys of "
                             f"shape {tuple(keys.shape)}; call model.reset_kv_cache() before a "
                             "new batch")
        if start + T > self.capacity:
            raise RuntimeError(
                f"PagedCache is full: each row holds {start} of {self.capacity} tokens and cannot "
                f"take {T} more; set it up with a larger max_len "
                "(model.set_kv_cache('paged', max_len=...)) or call model.reset_kv_cache()")
        need = math.ceil((start + T) / self.storage.block_size)
        while len(self.tables[0]) < need:  # each row its next block, in turn
            for table in self.tables:
                table.append(self.handed_out)
                self.handed_out += 1
        self.batch.set(self.tables, [start] * B, T, keys.device)

    def crop(self, n: int) -> None:
        """Every row keeps the blocks of its first ``n`` tokens; the blocks after go back (they
        were handed out in turn, row by row, so they are the last ones handed out)."""
        keep = math.ceil(n / self.storage.block_size)
        self.tables = [table[:keep] for table in self.tables]
        self.handed_out = keep * len(self.tables)


class PagedCache(KVCache):
    """One layer's keys and values, kept in the blocks of a ``BlockStorage`` shared by all
    layers.

    Whoever drives the batch sets it before each forward (``PagedBatch.set``: tables,
    positions, slots, mask): the engine, whose rows may each hold a different number of tokens,
    or, for ``cache="paged"``, the ``RowPager`` that the view of layer 0 calls. ``update``
    writes the new tokens into their slots and returns the batch's blocks gathered into
    ``(B, H, blocks * block_size, D)``; ``batch_mask`` hides each row's empty slots and future
    tokens. (Under a ``RowPager`` every row holds the same tokens, so the gathered keys are cut
    to the filled slots and attention needs no mask, as for "prealloc".)

    A decode step (one new token per row) reads the blocks where they lie instead, as vLLM's
    kernel does: ``attend_in_place`` writes the token and hands the block tables to
    ``paged_attention.c`` (``paged_kernel``). PyTorch's fused attention reads no keys through a
    block table, and FlexAttention, which does once compiled, is slower on a CPU than the
    gather (``python -m kvlib.bench flexpaged`` times all three). Where the kernel cannot run
    (no C compiler, another dtype or device, autograd), and for a prefill, ``update`` gathers:
    one copy of the batch's live blocks per layer, then the ordinary fused attention.
    ``python -m kvlib.bench serving`` times the paged decode step against a contiguous cache.
    """

    name = "paged"
    traits = Traits(takes_padding=False)  # rows of different lengths: kvlib.Engine
    options_hint = "block_size= (tokens per block; vLLM uses 16), max_len= (tokens per row)"

    def __init__(self, storage: BlockStorage, batch: PagedBatch, layer: int,
                 pager: RowPager | None = None) -> None:
        super().__init__()
        self.storage, self.batch, self.layer = storage, batch, layer
        self.pager = pager  # None: an engine sets the batch

    @classmethod
    def for_layers(cls, layers: list[LayerSpec], block_size: int = 16,
                   max_len: int | None = None) -> list[PagedCache]:
        """``cache="paged"`` without an engine: one storage for every layer, ``max_len`` tokens
        per row (default: the context length), and one view per layer; the view of layer 0
        pages the rows of an equal-length batch (``RowPager``)."""
        first = layers[0]
        if any((s.n_kv_heads, s.head_dim) != (first.n_kv_heads, first.head_dim) for s in layers):
            raise ValueError("one block storage serves layers of one shape: every layer must "
                             "have the same key/value heads and head size")
        storage = BlockStorage(len(layers), first.n_kv_heads, first.head_dim, block_size)
        batch = PagedBatch(block_size)
        pager = RowPager(storage, batch, max_len or first.context_length)
        return [cls(storage, batch, i, pager) for i in range(len(layers))]

    @classmethod
    def for_layer(cls, layer: LayerSpec, block_size: int = 16,
                  max_len: int | None = None) -> PagedCache:
        """A paged cache for one layer alone, with a storage of its own."""
        return cls.for_layers([layer], block_size, max_len)[0]

    @property
    def capacity(self) -> int | None:
        """Tokens it can hold: per row under a ``RowPager``, in all under an engine."""
        if self.pager is not None:
            return self.pager.capacity
        return self.storage.num_blocks * self.storage.block_size

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes // self.storage.n_layers  # this layer's share of the storage

    def next_positions(self, T: int) -> Tensor | None:
        if self.pager is not None:
            return None  # every row continues at get_seq_length()
        return self.batch.positions  # (B, T), set by the engine

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        K, V = self._write(keys, values)  # (N, bs, H, D)
        B, H, T, D = keys.shape
        tables = self.batch.tables  # (B, n)
        S = tables.shape[1] * self.storage.block_size
        rows = tables.view(-1)  # every row's blocks, in table order
        k = K.index_select(0, rows).view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
        v = V.index_select(0, rows).view(B, S, H, D).transpose(1, 2)
        self.seen += T
        if self.pager is not None:  # rows of equal length: their filled slots, in order
            return k[:, :, : self.seen], v[:, :, : self.seen]
        return k, v

    def attend_in_place(self, q: Tensor, keys: Tensor, values: Tensor) -> Tensor | None:
        """A decode step's attention read from the blocks where they lie
        (``paged_attention.c``), the new token written first: ``(B, H, 1, D)``, or None where
        the kernel does not run (see ``paged_kernel``), and ``attend`` calls ``update``."""
        kernel = decode_kernel(q, keys)
        if kernel is None or self.pager is None and self.batch.lengths is None:  # a packed row
            return None
        K, V = self._write(keys, values)
        self.seen += 1
        return kernel(q, K, V, self.batch.tables, self.batch.lengths)

    def _write(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The new tokens ``(B, H, T, D)`` into their slots (under a ``RowPager``, layer 0 sets
        the batch first); returns this layer's storage ``(N, bs, H, D)``."""
        self._check(keys, values, None)
        if self.pager is not None and self.layer == 0:  # this forward's batch, for every layer
            if self.pad is not None:
                raise ValueError("the paged cache alone takes rows of equal length: serve "
                                 "prompts of different lengths with kvlib.Engine")
            self.pager.advance(keys, self.seen)
        K, V = self.storage.keys[self.layer], self.storage.values[self.layer]  # (N, bs, H, D)
        B, H, T, D = keys.shape
        slots = self.batch.write_at  # (B * T,) into the storage seen as one run of N * bs slots
        K.view(-1, H, D).index_copy_(0, slots, keys.transpose(1, 2).reshape(B * T, H, D))
        V.view(-1, H, D).index_copy_(0, slots, values.transpose(1, 2).reshape(B * T, H, D))
        return K, V

    def crop(self, n: int) -> None:
        """Roll back to ``n`` tokens (``cache="paged"``: the blocks past them go back); under an
        engine, requests are rolled back by the engine, which owns their blocks."""
        if self.pager is None:
            raise ValueError("this PagedCache serves an engine's requests, each with its own "
                             "blocks: roll a request back through the engine, not the cache")
        n = self._kept(n)
        if self.layer == 0:
            self.pager.crop(n)
        self.seen = n

    def reorder(self, index: Tensor) -> None:
        """Beams on blocks share their common past: that is the engine's block-table fork with
        copy-on-write, not a copy of rows (two beams here would write into one block)."""
        raise ValueError("cache='paged' cannot reorder rows for beam search: its rows would "
                         "share blocks without copy-on-write. Use 'prealloc' or 'concat', or "
                         "kvlib.Engine's beam search, which forks block tables")

    def batch_mask(self, q_len: int, kv_len: int) -> Tensor | None:
        """Row b's query t sees slots ``0 .. start[b] + t`` of its gathered blocks: its own
        tokens, nothing after (the rest of its last block and the padding of its table)."""
        if self.pager is not None:
            return None  # the filled slots only: plain causal attention
        return self.batch.mask  # (B, 1, T, S)
