"""The one registry of cache strategies, written out here, and the one place that builds them.

A model asks ``build(name, layers, **options)`` for one cache per attention layer, giving a
``LayerSpec`` per layer; it never names a strategy. ``build`` checks the user's options against
what the strategy takes (its ``for_layer`` or ``__init__`` parameters) with errors that say what
to do, and the class does the rest. A reader's own strategy joins with ``register``::

    kvlib.caches.register("mine", MyCache)
    kvlib.generate(model, ids, 20, cache="mine")

A model with local (sliding-window) layers says so in their ``LayerSpec.window``: ``build`` then
gives those layers a ring of their window and the strategy asked to the other layers
(``with_local_layers``).
"""

from __future__ import annotations

import inspect

from .base import KVCache, LayerSpec
from .compressed import BFloat16Cache, EvictCache, QuantizedCache
from .paged import PagedCache
from .plain import ConcatCache, NoCache, PreallocCache, SlidingWindowCache
from .streaming import RecomputeCache, SinkCache

STRATEGIES: dict[str, type[KVCache]] = {
    "none": NoCache,  # nothing kept: every step recomputes (chapter 1)
    "concat": ConcatCache,  # grows with torch.cat (chapter 2)
    "prealloc": PreallocCache,  # max_len slots, allocated once (chapter 4)
    "sliding": SlidingWindowCache,  # a ring of window slots (chapter 5)
    "sinks": SinkCache,  # attention sinks + a ring, RoPE models (chapter 8)
    "recompute": RecomputeCache,  # the window recomputed every step (chapter 8)
    "bf16": BFloat16Cache,  # keys and values in bfloat16 (chapter 10)
    "quantized": QuantizedCache,  # int8 / int4, KIVI-style (chapter 10)
    "evict": EvictCache,  # H2O's heavy hitters (chapter 10)
    "paged": PagedCache,  # blocks of block_size tokens; many requests: kvlib.Engine (chapter 9)
}


def register(name: str, cls: type[KVCache]) -> type[KVCache]:
    """Make ``cls`` (a ``KVCache`` subclass) a strategy named ``name`` for ``set_kv_cache``,
    ``generate`` and ``perplexity``; returns the class (so it works as a decorator's body)."""
    if not (isinstance(cls, type) and issubclass(cls, KVCache)):
        raise TypeError(f"a cache strategy is a kvlib.KVCache subclass, got {cls!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a strategy's name is a non-empty string, got {name!r}")
    if name in STRATEGIES and STRATEGIES[name] is not cls:
        raise ValueError(f"{name!r} is already {STRATEGIES[name].__name__}; pick another name")
    STRATEGIES[name] = cls
    return cls


def strategy(name: str) -> type[KVCache]:
    """The class registered as ``name``, or an error listing the names there are."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown cache {name!r}; choose one of {list(STRATEGIES)} "
                         "(or register your own: kvlib.caches.register(name, cls))")
    return STRATEGIES[name]


def parameters(cls: type[KVCache]) -> dict[str, inspect.Parameter]:
    """The options a strategy takes: its ``for_layer``'s, or its ``__init__``'s when
    ``for_layer`` passes every option on."""
    own = dict(inspect.signature(cls.for_layer).parameters)
    own.pop("layer", None)
    if not cls.builds_from_layer() or any(p.kind is p.VAR_KEYWORD for p in own.values()):
        own = dict(inspect.signature(cls.__init__).parameters)
        own.pop("self", None)
    return {n: p for n, p in own.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def needs(name: str, option: str) -> bool:
    """Whether strategy ``name`` cannot be built without ``option`` (a "sliding" ``window``)."""
    param = parameters(strategy(name)).get(option)
    return param is not None and param.default is inspect.Parameter.empty


def taking(option: str) -> list[str]:
    """The registered strategies that take ``option``."""
    return [n for n, c in STRATEGIES.items() if option in parameters(c)]


def checked_options(name: str, context_length: int, max_len: int | None = None,
                    window: int | None = None, **options) -> dict:
    """The options of strategy ``name``, checked: ``window`` within the context and taken by
    the strategy, ``max_len`` defaulting to the context where it is taken (and dropped where it
    is not: ``generate`` offers it to every strategy), nothing the strategy does not take."""
    cls = strategy(name)
    params = parameters(cls)
    hint = f": {cls.options_hint}" if cls.options_hint else ""
    if window is not None and not 0 < window <= context_length:
        raise ValueError(f"window must be between 1 and the context length ({context_length} "
                         f"tokens), got {window}")
    if window is not None and "window" not in params:
        takers = ", ".join(repr(n) for n in taking("window"))
        raise ValueError(f"window applies to {takers}, not {name!r}{hint}")
    needed = params.get("window")
    if window is None and needed is not None and needed.default is inspect.Parameter.empty:
        raise ValueError(f"the {name!r} cache needs a window, e.g. window=256")
    if "window" in params and window is not None:
        options["window"] = window
    if "max_len" in params:
        options["max_len"] = max_len or context_length
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"the {name!r} cache takes no option {', '.join(unknown)} (it takes "
                         f"{', '.join(params) or 'none'}){hint}")
    return options


def build(name: str, layers: list[LayerSpec], *, max_len: int | None = None,
          window: int | None = None, **options) -> list[KVCache]:
    """One cache of strategy ``name`` per layer, from the user's options (see
    ``checked_options``). A model whose layers say a ``window`` of their own (local layers)
    gets ``with_local_layers``: those layers keep their window whatever ``name`` is."""
    ctx = layers[0].context_length
    kwargs = checked_options(name, ctx, max_len=max_len, window=window, **options)
    check_layers(name, layers)
    if all(layer.window is None for layer in layers):
        return STRATEGIES[name].for_layers(layers, **kwargs)
    return with_local_layers(name, layers, **kwargs)


def moves_keys(cls: type[KVCache]) -> bool:
    """Whether a strategy moves cached keys to other positions: it takes the model's RoPE
    frequencies (``inv_freq``), which is what rotating a key needs ("sinks")."""
    return "inv_freq" in inspect.signature(cls.__init__).parameters


def check_layers(name: str, layers: list[LayerSpec]) -> None:
    """Refuse, with the reason, a strategy that cannot serve the layers: one that moves cached
    keys, for layers that cache a latent (whose numbers no rotation moves)."""
    if moves_keys(strategy(name)) and any(layer.latent for layer in layers):
        raise ValueError(
            f"the {name!r} cache moves cached keys to new positions by rotating them with RoPE, "
            "but this model caches a latent per token (multi-head latent attention: the "
            "compressed c_kv, which carries no position, beside one RoPE key shared by every "
            "head), not rotated keys: use 'sliding' (the window without sinks) or 'recompute' "
            "(the window recomputed every step, which caches nothing)")


def with_local_layers(name: str, layers: list[LayerSpec], **options) -> list[KVCache]:
    """The caches of a model whose layers are local (a sliding window of their own,
    ``LayerSpec.window``) or global (every earlier token): Gemma 3's five local layers to one
    global, gpt-oss's alternation.

    A local layer never needs more than its window, so it gets a ring of that window
    (``SlidingWindowCache``; for "none", nothing kept and attention masked to the window); the
    global layers get strategy ``name`` with the user's ``options`` (``window=`` is theirs too),
    built together, so a storage their strategy shares (paged blocks) serves them alone.

    Refused: a strategy that changes how generation feeds the tokens (one token per call once
    full: "sinks", "evict"; a recomputed window: "recompute"). ``kvlib.generate`` learns that
    from the first layer's cache, a local layer's ring here, so the global layers would be fed
    what they cannot take.
    """
    cls = STRATEGIES[name]
    t = cls.traits
    if t.one_token_when_full or t.recomputes_window or t.needs_scores:
        local = [i for i, layer in enumerate(layers) if layer.window is not None]
        fits = [n for n, c in STRATEGIES.items() if not (c.traits.one_token_when_full
                or c.traits.recomputes_window or c.traits.needs_scores)]
        raise ValueError(
            f"the {name!r} cache cannot serve a model with sliding-window layers (layers "
            f"{local} attend over windows of their own): it changes how generation feeds the "
            "tokens (one per call once full, or a recomputed window), which generation reads "
            "from the first layer's cache, a local ring here. Use one of "
            f"{fits}: local layers get a ring of their window, global layers that strategy")
    glob = [layer for layer in layers if layer.window is None]
    made = iter(cls.for_layers(glob, **options) if glob else [])
    lookahead = options.get("lookahead", 0) if issubclass(cls, SlidingWindowCache) else 0
    return [next(made) if layer.window is None
            else SlidingWindowCache(layer.window, lookahead) if t.keeps_tokens
            else NoCache(window=layer.window) for layer in layers]
