"""The books of a block pool (see ``kvlib.serving``): which blocks are free, how many block
tables hold each one, and which full blocks can be found by their prefix. No tensors: the keys
and values live in ``kvlib.caches.BlockStorage`` under the same block ids, and every layer reads
them through its ``PagedCache``. (vLLM splits it the same way: ``v1/core/block_pool.py`` keeps
ids, reference counts, hashes and the free queue; the workers hold the tensors.)"""

from __future__ import annotations

import math

from ..caches.paged import check_block_size, check_num_blocks


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens, known by their ids ``0 .. num_blocks-1``:
    a reference count per block, the free blocks (oldest freed first) and a table of the full
    blocks that can be shared by prefix."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        check_block_size(block_size)
        check_num_blocks(num_blocks)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.refs = [0] * num_blocks  # how many block tables hold each block
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # oldest freed first
        self.by_prefix: dict[int, int] = {}  # prefix hash -> the block that holds it
        self.prefix_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (hash, tokens)

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

    def copy_on_write(self, block: int) -> int:
        """Copy-on-write, the books' half: a table that must write into the shared ``block``
        takes a new block in its place (one reference fewer on ``block``). The caller copies
        the contents (``BlockStorage.copy(block, new)``) before anything is written."""
        if self.refs[block] < 2:
            raise RuntimeError(f"block {block} is not shared: write into it, no copy needed")
        new = self.allocate()
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
