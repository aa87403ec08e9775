"""The interface every cache strategy shares.

- ``KVCache``: what an attention layer calls (``update``) and what everyone else reads
  (``get_seq_length``, ``capacity``, ``nbytes``, ``slot_positions``), in the vocabulary of
  Hugging Face's caches. A cache's ``get_seq_length()`` is the model's one position counter: the
  next token goes at that position.
- ``Traits``: what a strategy *is*, declared once by its class (``traits = Traits(...)``) and read
  where generation and attention are set up, never probed per step.
- ``LayerSpec``: what a cache may need to know of the layer it serves; the model hands one per
  layer to ``kvlib.caches.build``, so no model code ever names a strategy. A local layer (one
  that attends over a window of its own, as five in six of Gemma 3's do) says its ``window``.
- ``attention_mask``: the causal (and windowed) mask of queries that end a run of keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerSpec:
    """The attention layer a cache serves, as the model describes it."""

    n_kv_heads: int  # key/value heads (fewer than the query heads under GQA)
    head_dim: int
    context_length: int  # positions the model was trained on
    inv_freq: Tensor | None = None  # (D/2,) RoPE frequencies; None: the cached keys are not
    # rotated by RoPE (GPT-2's learned positions, a latent)
    # True: what is cached is a latent that attention expands, not keys and values (multi-head
    # latent attention, kvlib.models.deepseek): a strategy may store it, never move it as keys
    latent: bool = False
    window: int | None = None  # a local layer's own sliding window (Gemma 3); None: global


@dataclass(frozen=True)
class Traits:
    """What a strategy declares about itself, once, as a class attribute."""

    keeps_tokens: bool = True  # False: nothing cached, each step runs the (cropped) sequence
    recomputes_window: bool = False  # each step reruns only the last ``window`` tokens
    needs_scores: bool = False  # attention hands it the softmax weights (``observe``): H2O
    one_token_when_full: bool = False  # past ``capacity`` tokens, it takes one token per call
    reuses_slots: bool = False  # a slot's position is not its index (a ring): see slot_positions
    takes_padding: bool = False  # works for a left-padded batch (rows at different positions)
    rolls_back: bool = True  # crop(n) works whenever asked (speculative decoding's rejections)
    compiles: bool = False  # shapes that settle (buffers of one size, a fixed window): a few
    # torch.compile graphs serve every step (generate(..., compile=True) takes it)


class KVCache(nn.Module):
    """The interface (Hugging Face vocabulary) and the checks every strategy shares."""

    name: str = "base"
    traits: Traits = Traits()  # what the strategy is, declared once by each class
    options_hint: str = ""  # added to the error for an option the strategy does not take
    window: int | None = None  # attention span in tokens; None = everything before
    pad: Tensor | None = None  # (B,) left padding of each row of a batch; see set_padding

    def __init__(self) -> None:
        super().__init__()
        # Tokens written so far: the next token's position, which the model reads through
        # get_seq_length() (the one position counter; chapter 2).
        self.seen = 0

    @classmethod
    def for_layer(cls, layer: LayerSpec, **options) -> KVCache:
        """This strategy's cache for one attention layer. ``options`` are the user's, already
        checked against ``__init__`` by ``kvlib.caches.build``; a strategy that needs something of
        the layer (its RoPE frequencies, its head size) overrides this."""
        return cls(**options)

    @classmethod
    def builds_from_layer(cls) -> bool:
        """Whether ``for_layer`` was written for this class's ``__init__``: False for a subclass
        that defines its own ``__init__`` below the class that wrote ``for_layer`` (a reader's
        ``class Mine(QuantizedCache): def __init__(self): ...``), which is then built with the
        options its ``__init__`` takes."""
        def owner(attr: str) -> type:
            return next(k for k in cls.__mro__ if attr in vars(k))
        return issubclass(owner("for_layer"), owner("__init__"))

    @classmethod
    def for_layers(cls, layers: list[LayerSpec], **options) -> list[KVCache]:
        """One cache per layer (a strategy whose layers share storage overrides this)."""
        if not cls.builds_from_layer():
            return [cls(**options) for _ in layers]
        return [cls.for_layer(layer, **options) for layer in layers]

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store new ``(B, H, T, D)`` keys/values; return the keys/values attention must see."""
        raise NotImplementedError

    def attend_in_place(self, q: Tensor, keys: Tensor, values: Tensor) -> Tensor | None:
        """A decode step's attention done by the cache over its own storage, where a kernel
        reads it as it lies (``PagedCache``): the output ``(B, H, 1, D)``, the new token stored.
        None, here: ``attend`` calls ``update`` and attends over what it returns."""
        return None

    def get_seq_length(self) -> int:
        """Tokens this cache has been given since the last reset."""
        return self.seen

    def reset(self) -> None:
        """Forget every token (buffers may be kept for reuse)."""
        self.seen = 0

    def crop(self, n: int) -> None:
        """Keep the first ``n`` tokens and forget the rest (``n < 0``: drop the last ``-n``), as
        transformers' ``DynamicCache.crop``: the next token goes at position ``n``, and
        generating on gives the tokens of a fresh run on those ``n``. Speculative decoding rolls
        back a draft's rejected tokens so. A strategy that cannot (its tokens were overwritten,
        merged or scored) raises with the reason; this one has not said how."""
        raise NotImplementedError(f"{type(self).__name__} cannot roll back: write crop(n), which "
                                  "keeps the first n tokens (and sets self.seen = n)")

    def reorder(self, index: Tensor) -> None:
        """Beam search: row ``b`` of the batch becomes what row ``index[b]`` was, in every
        buffer (``index_select`` on the batch, transformers' ``reorder_cache``)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.index_select(0, index.to(buf.device))
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index.to(self.pad.device))

    def _kept(self, n: int) -> int:
        """``crop``'s ``n`` as the number of tokens to keep, between 0 and ``seen``."""
        if not isinstance(n, int):
            raise TypeError(f"crop takes a number of tokens, got {n!r}")
        return max(self.seen + n, 0) if n < 0 else min(n, self.seen)

    @property
    def capacity(self) -> int | None:
        """Most tokens the cache can hold at once; None when it grows without bound."""
        return None

    @property
    def tokens_held(self) -> int:
        """Tokens whose keys and values are in the cache now."""
        cap = self.capacity
        return self.seen if cap is None else min(self.seen, cap)

    def slot_positions(self) -> list[int]:
        """The position of the token each slot of the key buffer holds, in slot order, -1 for a
        slot not written yet (pictures and tests). Caches that append keep position p in slot p;
        one whose traits say ``reuses_slots`` must say where its tokens are."""
        if self.traits.reuses_slots:
            raise NotImplementedError(f"{type(self).__name__} reuses slots (its traits say so), so "
                                      "slot p does not hold position p: write slot_positions()")
        keys = getattr(self, "keys", None)
        slots = 0 if keys is None else keys.shape[2]
        return [s if s < self.tokens_held else -1 for s in range(slots)]

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage this cache holds right now."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def next_positions(self, T: int) -> Tensor | None:
        """Positions ``(B, T)`` of the next ``T`` tokens of each row when the rows of a batch
        differ (left padding: a row's first real token is at position 0); None when every row
        continues at ``seen``, the model's own counter."""
        if self.pad is None:
            return None
        pos = torch.arange(self.seen, self.seen + T, device=self.pad.device)
        return (pos[None, :] - self.pad[:, None]).clamp_min(0)  # (B, T); padding sits at 0

    def batch_mask(self, q_len: int, kv_len: int) -> Tensor | None:
        """Boolean ``(B, 1, q_len, kv_len)`` mask when rows differ (None: they do not): a query
        sees the keys up to its own slot, never a row's padding. A padding query sees itself
        only, so that its (unused) output stays finite: a row with nothing to attend to would
        give NaN, and NaN times a zero weight is still NaN in the next layer."""
        if self.pad is None:
            return None
        q_slot = torch.arange(kv_len - q_len, kv_len, device=self.pad.device)[:, None]  # (T, 1)
        k_slot = torch.arange(kv_len, device=self.pad.device)[None, :]  # (1, S)
        real = k_slot[None] >= self.pad[:, None, None]  # (B, 1, S): not padding
        mask = (k_slot <= q_slot)[None] & real | (k_slot == q_slot)[None]  # (B, T, S)
        return mask[:, None]  # (B, 1, T, S): the same for every head

    def _allocate(self, like: Tensor, slots: int) -> None:
        """Fixed buffers of ``slots`` tokens, made on the first write after a reset and kept for
        the next text unless its batch size, dtype or device differ (or buffers made under
        ``torch.inference_mode``, as ``generate`` runs, would be written outside it)."""
        B, H, _, D = like.shape
        held = self.keys
        if held is None or held.shape != (B, H, slots, D) or held.dtype != like.dtype \
                or held.device != like.device or held.is_inference() != like.is_inference():
            self.keys = like.new_empty(B, H, slots, D)  # (B, H, slots, D)
            self.values = like.new_empty(B, H, slots, D)

    def _check(self, keys: Tensor, values: Tensor, held: Tensor | None) -> None:
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(
                "keys and values must have the same shape [batch, heads, tokens, head_dim], "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if held is None or self.seen == 0:
            return
        if keys.dtype != held.dtype or keys.device != held.device:
            raise TypeError(
                f"new keys are {keys.dtype} on {keys.device} but the cache holds {held.dtype} "
                f"on {held.device}; call model.reset_kv_cache() after moving or casting the model"
            )
        if keys.shape[0] != held.shape[0] or keys.shape[1::2] != held.shape[1::2]:
            raise ValueError(
                f"the cache holds batch size {held.shape[0]} (shape {tuple(held.shape)}) but got "
                f"keys of shape {tuple(keys.shape)}; call model.reset_kv_cache() before a new batch"
            )



def attention_mask(q_len: int, kv_len: int, window: int | None, device) -> Tensor | None:
    """Boolean ``(q_len, kv_len)`` mask (True = may attend) for queries that are the last ``q_len``
    of ``kv_len`` consecutive positions; None when every key is visible (a decode step)."""
    if q_len == 1 and (window is None or kv_len <= window):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask
