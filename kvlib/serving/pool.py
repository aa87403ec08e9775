"""The block pool: every layer's blocks, their reference counts and prefix hashes (see
``kvlib.serving``); one layer's view of it is ``kvlib.caches.PagedCache``."""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
