"""``check_cache``: plug a cache class a reader wrote into a small model and check it as a
maintainer would, with hints that point at the likely mistake.

    class MyCache(kvlib.KVCache):
        def update(self, keys, values): ...
    kvlib.check_cache(MyCache)            # prints one line per check; raises on the first failure

The checks, in order: the interface; ``update`` on its own (a prefill, then one token: how many
keys come back, and are they the stored ones); ``get_seq_length`` and ``reset``; greedy tokens
equal to recomputation and teacher-forced logits within a tolerance, for prompts around the
window's edges when the cache has a window; and ``nbytes`` against the bytes it should hold.

A sink cache (``n_sink=``) computes, once full, a model of its own: its reference is kvlib's
``SinkCache`` (itself checked against attention written out pair by pair, tests/test_streaming.py),
on a small Llama, since sinks move keys with RoPE.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .caches import KVCache, LayerSpec
from .caches.registry import parameters
from .generate import generate, prefill
from .loading import load_model
from .models import CausalLM, GPTConfig, LlamaConfig
from .models.llama import rope_frequencies

# The model every check runs on: GPT-2's architecture cut to 2 layers of 2 heads of 16 numbers,
# with a 512-token vocabulary (no preset is this small: the logits of GPT-2's 50,257 tokens would
# cost more than the whole model, and the bytes each check prints follow from these shapes).
CHECK_MODEL = GPTConfig(vocab_size=512, context_length=512, emb_dim=32, n_heads=2, n_layers=2)
# Sinks move keys with RoPE: the same sizes in the Llama family (one key/value head per two).
CHECK_ROPE_MODEL = LlamaConfig(vocab_size=512, context_length=512, emb_dim=32, n_heads=2,
                               n_kv_heads=1, n_layers=2, ffn_dim=64, head_dim=16,
                               rope_theta=10000.0)

TOLERANCE = 1e-5  # teacher-forced logits, float32, against recomputation
SINK_TOLERANCE = 1e-4  # against kvlib's SinkCache: a sink moved another way rounds otherwise


class CacheCheckError(AssertionError):
    """A check failed; the message says what was seen and what to look at."""


@dataclass
class Check:
    name: str
    detail: str


def check_cache(cache_cls: type, *, window: int | None = None, max_len: int = 64,
                n_sink: int | None = None, verbose: bool = True) -> list[Check]:
    """Check a cache class (a ``kvlib.KVCache`` subclass, built as a model builds it, with no
    option, ``max_len=`` or ``window=`` as its ``__init__`` or ``for_layer`` asks; ``n_sink=``
    with ``window=`` for a sink cache). Prints a line per passed check when ``verbose``; raises
    ``CacheCheckError`` with a hint at the first failure; returns the checks that passed."""
    make = _Maker(cache_cls, window, max_len, n_sink)
    W = make.sinks.capacity if make.sinks else getattr(make(), "window", None)
    passed: list[Check] = []

    def run(name: str, fn: Callable[[], str]) -> None:
        detail = fn()
        passed.append(Check(name, detail))
        if verbose:
            print(f"ok  {name}: {detail}")

    run("interface", lambda: _check_interface(make))
    run("update", lambda: _check_update(make, W))
    run("reset", lambda: _check_reset(make))
    model = _model(rope=make.sinks is not None)
    for prompt_len in _prompt_lengths(W):
        run(f"tokens, prompt of {prompt_len}",
            lambda n=prompt_len: _check_tokens(model, make, W, n))
    run("logits", lambda: _check_logits(model, make, W))
    run("nbytes", lambda: _check_nbytes(model, make, W, max_len))
    if isinstance(cache_cls, type) and issubclass(cache_cls, KVCache) \
            and cache_cls.crop is not KVCache.crop:  # it says it can roll back: check it
        run("rollback", lambda: _check_rollback(model, make, W))
    if verbose:
        print(f"{cache_cls.__name__} passed all {len(passed)} checks")
    return passed


class _Maker:
    """The reader's caches, built as a model builds them: ``make()`` one alone (the checks of
    ``update`` and ``reset``), ``make.for_model(model)`` one per layer from the model's layer
    specs (``for_layers``: a strategy whose layers share one storage, "paged", gets one)."""

    def __init__(self, cache_cls: type, window: int | None, max_len: int,
                 n_sink: int | None = None) -> None:
        self.built = isinstance(cache_cls, type) and issubclass(cache_cls, KVCache)
        params = parameters(cache_cls) if self.built else inspect.signature(cache_cls).parameters
        self.options = ({"window": window or 8} if "window" in params
                        else {"max_len": max_len} if "max_len" in params else {})
        if n_sink is not None:
            if "n_sink" not in params or "window" not in params:
                _fail(f"n_sink= checks a sink cache, but {cache_cls.__name__} takes no n_sink "
                      "and window: subclass kvlib.SinkCache, whose __init__ takes them")
            self.options["n_sink"] = n_sink
        # the options as kvlib's own sink cache takes them: the reference of a sink cache
        self.sinks = _Sinks(self.options["window"], n_sink) if n_sink is not None else None
        self.cls, self.max_len = cache_cls, max_len

    def __call__(self) -> KVCache:
        spec = LayerSpec(n_kv_heads=2, head_dim=4, context_length=self.max_len,  # as _kv's
                         inv_freq=rope_frequencies(4, 10000.0))
        return self._for_specs([spec])[0]

    def for_model(self, model: CausalLM) -> list[KVCache]:
        return self._for_specs(model.layer_specs())

    def _for_specs(self, specs: list[LayerSpec]) -> list[KVCache]:
        if self.built:
            return self.cls.for_layers(specs, **self.options)
        return [self.cls(**self.options) for _ in specs]  # not a KVCache: the interface says


@dataclass
class _Sinks:
    window: int
    n_sink: int

    capacity = property(lambda self: self.n_sink + self.window)

    def reference(self) -> dict:  # what generate takes for kvlib's sink cache
        return {"cache": "sinks", "window": self.window, "n_sink": self.n_sink}


def _fail(message: str) -> None:
    raise CacheCheckError(message)


def _kv(tokens: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, tokens, 4, generator=g) for _ in "kv")  # (B, H, T, D)


def _check_interface(make: _Maker) -> str:
    cache = make()
    if not isinstance(cache, KVCache):
        _fail(f"{type(cache).__name__} is not a kvlib.KVCache: subclass it "
              "(class MyCache(kvlib.KVCache)), so the model can hold it as a module")
    for name in ("update", "get_seq_length", "reset"):
        if not callable(getattr(cache, name, None)):
            _fail(f"the cache has no method {name}()")
    if cache.get_seq_length() != 0:
        _fail(f"a new cache says get_seq_length() = {cache.get_seq_length()}: it should be 0")
    return "a KVCache with update, get_seq_length and reset"


def _update(cache: KVCache, keys: Tensor, values: Tensor, when: str) -> tuple[Tensor, Tensor]:
    out = cache.update(keys, values)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        _fail(f"{when}, update returned {type(out).__name__}: it must return the pair "
              "(keys, values) that attention should see")
    return out


def _check_update(make: _Maker, W: int | None) -> str:
    cache = make()
    k, v = _kv(5, seed=1)
    keys, values = _update(cache, k, v, "after a prefill of 5 tokens")
    if keys.shape[2] != 5:
        _fail(f"after a prefill of 5 tokens your cache returned {keys.shape[2]} keys: a prefill "
              "attends over exactly its own tokens; did update return the stored keys?")
    k1, v1 = _kv(1, seed=2)
    keys, values = _update(cache, k1, v1, "after 6 tokens")
    want = 6 if W is None else min(6, W)
    if keys.shape[2] != want:
        hint = ("did update return the stored keys or only the new ones?" if keys.shape[2] == 1
                else "count the slots that hold a token, including the one just written")
        _fail(f"after 6 tokens your cache returned {keys.shape[2]} keys, expected {want}: {hint}")
    if not any(torch.equal(keys[:, :, i], k1[:, :, 0]) for i in range(keys.shape[2])):
        _fail("the keys update returned do not contain the new token's key: write it before "
              "returning")
    if W is None and not torch.equal(keys[:, :, :5], k):
        _fail("the first 5 keys update returned are not the 5 keys of the prefill, in order: "
              "did a write land in the wrong slot, or overwrite an earlier token?")
    if cache.get_seq_length() != 6:
        _fail(f"after 6 tokens get_seq_length() says {cache.get_seq_length()}: count every "
              "token update has been given since the last reset")
    return f"a prefill returns its 5 keys, one more token returns {want}; length 6"


def _check_reset(make: _Maker) -> str:
    cache = make()
    _update(cache, *_kv(5, seed=3), "after a prefill of 5 tokens")
    cache.reset()
    if cache.get_seq_length() != 0:
        _fail(f"after reset() get_seq_length() is {cache.get_seq_length()}: reset must forget "
              "every token (call super().reset(), which sets the counter to 0)")
    k, v = _kv(3, seed=4)
    keys, _ = _update(cache, k, v, "after reset() and 3 new tokens")
    if keys.shape[2] != 3 or not torch.equal(keys, k):
        _fail(f"after reset() and a prefill of 3 tokens the cache returned {keys.shape[2]} "
              "keys that are not just the new ones: the old text is still in there")
    return "a reset cache starts a new text from nothing"


def _model(rope: bool = False) -> CausalLM:
    """``CHECK_MODEL`` (``CHECK_ROPE_MODEL`` for sinks) with seeded random weights, through the
    one loader."""
    return load_model(CHECK_ROPE_MODEL if rope else CHECK_MODEL, seed=0)


def _prompt_lengths(W: int | None) -> list[int]:
    """Prompts around the window's edges (W - 1, W, W + 1, longer than W), else two lengths."""
    return [5, 12] if W is None else sorted({max(1, W - 1), W, W + 1, 2 * W + 3})


def _fresh(model: CausalLM, make: _Maker) -> list[KVCache]:
    """One new cache of the reader's class per layer (plugged in with ``model.using``)."""
    return make.for_model(model)


@torch.no_grad()
def _cached_tokens(model: CausalLM, caches: list[KVCache], prompt: Tensor,
                   n: int) -> list[int]:
    with model.using(caches):
        logits = prefill(model, prompt)  # as generate feeds it (a full sink cache: one a call)
        out = []
        for _ in range(n):
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            out.append(int(nxt))
            logits = model(nxt, use_cache=True)[:, -1]
    return out


def _check_tokens(model: CausalLM, make: _Maker, W: int | None,
                  prompt_len: int) -> str:
    n = 2 * (W or 8) + 4  # decode well past the window
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=g)
    sinks = make.sinks
    reference = sinks.reference() if sinks else {"cache": None, "window": W}
    ref = generate(model, prompt, n, **reference).tokens[0, prompt_len:].tolist()
    mine = _cached_tokens(model, _fresh(model, make), prompt, n)
    what = "kvlib's SinkCache's" if sinks else "recomputation's"
    if mine != ref:
        step = next(i for i, (a, b) in enumerate(zip(mine, ref, strict=True)) if a != b)
        pos = prompt_len + step
        hint = _sink_hint(sinks, pos) if sinks else _window_hint(W, pos)
        _fail(f"with a prompt of {prompt_len} tokens the greedy tokens equal {what} for "
              f"{step} steps, then differ at step {step} (the token at position {pos}).{hint}")
    label = f" ({sinks.n_sink} sinks + window {sinks.window})" if sinks else (
        f" (window {W})" if W else "")
    return f"{n} greedy tokens equal {what}{label}"


@torch.no_grad()
def _check_logits(model: CausalLM, make: _Maker, W: int | None) -> str:
    T = 3 * (W or 8)
    seq = torch.randint(0, model.cfg.vocab_size, (1, T),
                        generator=torch.Generator().manual_seed(9))
    sinks = make.sinks
    if sinks:  # kvlib's sink cache, a token at a time
        model.set_kv_cache("sinks", window=sinks.window, n_sink=sinks.n_sink)
        ref = torch.cat([model(seq[:, t : t + 1], use_cache=True) for t in range(T)], dim=1)
    else:
        model.set_kv_cache("none", window=W)
        ref = model(seq, use_cache=True)  # (1, T, vocab): masked to the window, if any
    with model.using(_fresh(model, make)):
        mine = torch.cat([model(seq[:, t : t + 1], use_cache=True) for t in range(T)], dim=1)
    err = (mine - ref).abs().amax(dim=-1)[0]  # (T,)
    tol, what = (SINK_TOLERANCE, "kvlib's SinkCache") if sinks else (TOLERANCE, "recomputation")
    if float(err.max()) > tol:
        t = int((err > tol).nonzero()[0])
        hint = _sink_hint(sinks, t) if sinks else _window_hint(W, t)
        _fail(f"teacher-forced logits differ from {what}'s by {float(err.max()):.2g} "
              f"(tolerance {tol:g}), first at position {t}: the keys and values attention "
              f"saw there are not the ones it should see.{hint}")
    return f"{T} teacher-forced positions within {tol:g} of {what}"


def _sink_hint(sinks: _Sinks, pos: int) -> str:
    if pos < sinks.capacity:
        return (f" The cache is not full before position {sinks.capacity}: it should append, "
                "as a preallocated cache does.")
    return (f" From position {sinks.capacity} on the cache is full: the token at position p "
            f"goes to slot n_sink + (p - n_sink) % window, and the sink keys must sit just "
            "before the window's oldest token, moved by delta = seen - capacity positions "
            "from where they were first rotated (rotate the unmoved copy, not the last one).")


def _window_hint(W: int | None, pos: int) -> str:
    if W is None or pos < W:
        return ""
    return (f" The window of {W} starts overwriting at position {W}: check which slot the token "
            "at position p goes to (p % window) and that the keys returned are the last window "
            "tokens.")


def _check_nbytes(model: CausalLM, make: _Maker, W: int | None,
                  max_len: int) -> str:
    tokens = 10
    caches = _fresh(model, make)
    _cached_tokens(model, caches, torch.zeros(1, 1, dtype=torch.long), tokens - 1)
    cache = caches[0]
    cfg = model.cfg
    per_token = 2 * getattr(cfg, "n_kv_heads", cfg.n_heads) * cfg.head_dim * 4  # k + v, float32
    held = cache.tokens_held if cache.capacity is None else cache.capacity
    if held > 0 and cache.nbytes == 0:
        _fail("nbytes is 0 while the cache holds tokens: register keys and values as buffers "
              "(self.register_buffer('keys', None, persistent=False)) so nbytes can see them")
    want = per_token * held
    extra = per_token // 2 * make.sinks.n_sink if make.sinks else 0  # an unmoved sink copy
    if cache.nbytes not in {want, want + extra}:
        _fail(f"after {tokens} tokens nbytes is {cache.nbytes}, expected {want} "
              f"({held} token slots x {per_token} bytes): does the cache keep copies, or "
              "allocate more (or less) than its capacity?")
    return f"{cache.nbytes} bytes for {held} token slots in one layer"


@torch.no_grad()
def _check_rollback(model: CausalLM, make: _Maker, W: int | None) -> str:
    """A prompt, a few more tokens one at a time, ``crop`` back by 2; then the next 6 greedy
    tokens and their logits must be a fresh cache's after the kept tokens. At most 7 tokens, and
    no more than a window holds, so that nothing has been overwritten."""
    total = 7 if W is None else min(7, W)
    if total < 3:
        return f"window {W}: too small to roll back within"
    prompt, keep = max(1, total - 4), total - 2
    seq = torch.randint(0, model.cfg.vocab_size, (1, total),
                        generator=torch.Generator().manual_seed(11))
    rolled, fresh = make.for_model(model), make.for_model(model)
    with model.using(rolled):
        model(seq[:, :prompt], use_cache=True)
        for t in range(prompt, total):
            model(seq[:, t : t + 1], use_cache=True)
        try:
            model.crop_kv_cache(keep)
        except (ValueError, NotImplementedError) as err:
            _fail(f"crop({keep}) after {total} tokens raised {type(err).__name__}: {err}. "
                  f"Nothing has been overwritten yet, so it should keep the first {keep} tokens")
    if any(c.get_seq_length() != keep for c in rolled):
        _fail(f"after crop({keep}) get_seq_length() is {rolled[0].get_seq_length()}: crop must "
              f"set the counter to {keep} (self.seen = n)")
    with model.using(fresh):
        model(seq[:, :keep], use_cache=True)
    (mine, mine_logits), (want, want_logits) = (_greedy_on(model, c, seq[:, keep : keep + 1], 6)
                                                for c in (rolled, fresh))
    err = float((mine_logits - want_logits).abs().max())
    if mine != want or err > TOLERANCE:
        _fail(f"after crop({keep}) the next tokens and logits differ from a fresh cache's after "
              f"the same {keep} tokens (logits by {err:.2g}): crop must drop the keys and "
              f"values after position {keep}, so the next token is written and read as if they "
              "never came")
    return f"crop({keep}) after {total} tokens continues as a fresh cache after {keep}"


def _greedy_on(model: CausalLM, caches: list[KVCache], first: Tensor,
               n: int) -> tuple[list[int], Tensor]:
    """Feed ``first`` through ``caches``, then ``n`` greedy tokens: (tokens, their logits)."""
    with model.using(caches):
        logits, tokens, seen = model(first, use_cache=True)[:, -1], [], []
        for _ in range(n):
            seen.append(logits)
            tokens.append(int(logits.argmax(-1)))
            logits = model(torch.tensor([[tokens[-1]]]), use_cache=True)[:, -1]
    return tokens, torch.stack(seen)


def check_absorbed(fn: Callable[[Tensor, Tensor], Tensor], verbose: bool = True) -> str:
    """Grade a reader's absorbed query: ``fn(q_nope, w_uk)`` with ``q_nope`` ``(B, H, T, Dn)``
    (each head's query channels without position) and ``w_uk`` ``(H, Dn, R)`` (``kv_b_proj``'s key
    half: head ``h``'s key is ``w_uk[h] @ c_kv``) must return ``(B, H, T, R)`` queries that
    score the latent ``c_kv`` ``(B, S, R)`` itself: ``fn(q, w) @ c_kv^T`` equal to
    ``q @ k_nope^T`` with the keys decompressed. Raises ``CacheCheckError`` with a hint."""
    g = torch.Generator().manual_seed(0)
    B, H, T, S, Dn, R = 2, 3, 4, 7, 8, 12
    q = torch.randn(B, H, T, Dn, generator=g, dtype=torch.float64)
    w = torch.randn(H, Dn, R, generator=g, dtype=torch.float64)
    c_kv = torch.randn(B, S, R, generator=g, dtype=torch.float64)
    k_nope = torch.einsum("hdr,bsr->bhsd", w, c_kv)  # (B, H, S, Dn): "naive", decompressed
    want = q @ k_nope.transpose(-1, -2)  # (B, H, T, S)
    got_q = fn(q, w)
    if not isinstance(got_q, Tensor) or tuple(got_q.shape) != (B, H, T, R):
        shape = tuple(got_q.shape) if isinstance(got_q, Tensor) else type(got_q).__name__
        _fail(f"absorbed queries must be (B, H, T, R) = {(B, H, T, R)}, one latent-sized query "
              f"per head and token; got {shape}. Contract q_nope's last dim (Dn) with w_uk's "
              "middle one, head by head: torch.einsum('bhtd,hdr->bhtr', q_nope, w_uk)")
    got = got_q @ c_kv[:, None].transpose(-1, -2)  # (B, H, T, S): scored against the latent
    if not torch.allclose(got, want, atol=1e-9):
        swapped = torch.einsum("bhtd,hdr->bhtr", q, w.flip(0)) @ c_kv[:, None].transpose(-1, -2)
        hint = ("each head must use its own w_uk[h]" if torch.allclose(got, swapped) else
                "head h's score is q_nope[h] . (w_uk[h] @ c_kv) = (q_nope[h] @ w_uk[h]) . c_kv")
        _fail(f"the absorbed scores differ from the decompressed ones by up to "
              f"{float((got - want).abs().max()):.3g}: {hint}")
    detail = (f"q_nope W_UK scores the cached latent exactly as the decompressed keys do "
              f"({B}x{H} heads, {S} latents of {R} numbers instead of {H} keys of {Dn})")
    if verbose:
        print(f"ok  absorbed query: {detail}")
    return detail
