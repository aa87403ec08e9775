"""Graders for chapter 10's exercises, in the manner of ``kvlib.check``: each runs the reader's
function on cases a maintainer would pick, prints an ``ok`` line per passed check when
``verbose``, and raises ``kvlib.CacheCheckError`` with a hint at the likely mistake.

    kvlib.check_quantizer(my_quantize, my_dequantize)    # one group, min-max, against kvlib's
    kvlib.check_victims(my_victims, model, ids)          # H2O's eviction rule, on a real run

``check_quantizer`` feeds groups of 32 numbers (random, all negative, with one outlier,
constant) at 8, 4 and 2 bits and checks the codes (whole numbers in ``[0, 2**bits - 1]``, the
minimum at 0, the maximum at the top level), the bound ``|x - x_hat| <= scale / 2`` and the
agreement with ``kvlib.caches.quantize``, whose float16 scale and zero point are rounded outward.
``check_victims`` runs a model with an ``EvictCache`` and compares the reader's choice of slot
with ``EvictCache.victims`` in every layer and head at several lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .caches import EvictCache
from .caches.compressed import quantize
from .check import Check, _fail
from .generate import prefill
from .models import CausalLM
from .state import preserved_state

GROUP = 32  # numbers in each group fed to the reader's quantizer
BITS = (8, 4, 2)
SCALE_ULP = 2.0**-10  # float16 keeps 10 bits of mantissa: kvlib's scale is within a step or two

Quantizer = Callable[[Tensor, int], tuple]
Dequantizer = Callable[[Tensor, float, float], Tensor]


# ---- the quantizer ---------------------------------------------------------------------------

def quantizer_groups() -> dict[str, Tensor]:
    """The groups ``check_quantizer`` feeds, 32 float32 numbers each (seeded)."""
    g = torch.Generator().manual_seed(0)
    outlier = 0.5 * torch.randn(GROUP, generator=g)
    outlier[7] = 12.0  # one number far above the rest stretches the spacing for all of them
    return {
        "a random group": torch.randn(GROUP, generator=g),
        "an all-negative group": -3.0 - 2.0 * torch.rand(GROUP, generator=g),
        "a group with one outlier": outlier,
        "a constant group": torch.full((GROUP,), 0.75),
    }


def check_quantizer(quantize_fn: Quantizer, dequantize_fn: Dequantizer,
                    bits: Sequence[int] = BITS, verbose: bool = True) -> list[Check]:
    """Grade ``quantize_fn(x, bits) -> (codes, scale, zero)``, asymmetric min-max over the
    whole group ``x`` ``(N,)`` (``zero = min``, ``scale = (max - min) / (2**bits - 1)``, codes
    rounded to the nearest level), and ``dequantize_fn(codes, scale, zero) -> x_hat``
    (``codes * scale + zero``). Raises ``CacheCheckError`` with a hint at the first failure;
    returns the checks that passed."""
    passed: list[Check] = []
    for b in bits:
        for name, x in quantizer_groups().items():
            detail = _check_group(quantize_fn, dequantize_fn, x, b, f"int{b}, {name}")
            passed.append(Check(f"int{b}, {name}", detail))
            if verbose:
                print(f"ok  int{b}, {name}: {detail}")
    if verbose:
        print(f"the quantizer passed all {len(passed)} checks")
    return passed


def _number(value: object, what: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        _fail(f"{where}: the {what} must be one number for the whole group (a float or a "
              f"one-element tensor), got {type(value).__name__}")


def _quantized(quantize_fn: Quantizer, x: Tensor, bits: int, where: str
               ) -> tuple[Tensor, float, float]:
    out = quantize_fn(x.clone(), bits)
    if not (isinstance(out, tuple) and len(out) == 3):
        _fail(f"{where}: the quantizer must return the tuple (codes, scale, zero), got "
              f"{type(out).__name__}")
    codes, scale, zero = out
    if not isinstance(codes, Tensor) or codes.shape != x.shape:
        got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        _fail(f"{where}: the codes must be a tensor of the group's shape {tuple(x.shape)}, one "
              f"code per number; got {got}")
    return codes, _number(scale, "scale", where), _number(zero, "zero point", where)


def _check_group(quantize_fn: Quantizer, dequantize_fn: Dequantizer, x: Tensor, bits: int,
                 where: str) -> str:
    lo, hi = float(x.min()), float(x.max())
    codes, scale, zero = _quantized(quantize_fn, x, bits, where)
    c = codes.double()
    if not (torch.isfinite(c).all() and 0 < scale < float("inf")):
        hint = ("max - min is 0 here, so the scale (max - min) / levels is 0 and "
                "(x - zero) / scale divides by zero: keep the scale above 0, "
                "max(scale, 1e-12)" if hi == lo else
                "the scale is (max - min) / (2**bits - 1), a positive number")
        _fail(f"{where}: scale {scale:g}, codes {_few(codes)}: {hint}")
    if not torch.equal(c, c.round()):
        _fail(f"{where}: the codes are not whole numbers ({_few(codes)}): round "
              "(x - zero) / scale to the nearest level, .round(), and store that")
    _check_levels(x, c, codes.dtype, scale, zero, bits, where)
    x_hat = dequantize_fn(codes, scale, zero)
    if not isinstance(x_hat, Tensor) or x_hat.shape != x.shape:
        _fail(f"{where}: the dequantizer must return a tensor of the group's shape "
              f"{tuple(x.shape)}, got {type(x_hat).__name__}")
    tol = 1e-5 * (1.0 + abs(lo) + abs(hi))  # float32 rounding of x - zero, / scale, * scale
    x_hat = x_hat.double()
    if float((x_hat - (c * scale + zero)).abs().max()) > tol:
        _fail(f"{where}: the dequantizer gave {_few(x_hat)} for codes {_few(codes)}, scale "
              f"{scale:.4g} and zero {zero:.4g}: it should return codes * scale + zero")
    err = (x.double() - x_hat).abs()  # (N,)
    if float(err.max()) > scale / 2 + tol:
        i = int(err.argmax())
        _fail(f"{where}: number {i} ({float(x[i]):.4f}) came back as {float(x_hat[i]):.4f}, "
              f"off by {float(err[i]):.4g}, more than scale / 2 = {scale / 2:.4g}: "
              + _bound_hint(x, c, scale, zero, bits))
    return _against_kvlib(x, c, scale, zero, bits, where, float(err.max()))


def _check_levels(x: Tensor, c: Tensor, dtype: torch.dtype, scale: float, zero: float,
                  bits: int, where: str) -> None:
    """The codes lie in ``[0, 2**bits - 1]``, the minimum at 0 and the maximum at the top."""
    top, lo, hi = 2**bits - 1, float(x.min()), float(x.max())
    if float(c.min()) < 0 or float(c.max()) > top:
        bad = float(c.max()) if float(c.max()) > top else float(c.min())
        if bad == 2**bits:
            hint = ("there are 2**bits levels, 0 to 2**bits - 1, so the scale is "
                    "(max - min) / (2**bits - 1), and the maximum lands on 2**bits - 1")
        elif bad < 0 and zero > lo:
            hint = (f"the zero point {zero:.4g} is above the group's minimum {lo:.4g}: "
                    "asymmetric min-max puts the zero point at the minimum")
        else:
            hint = f"clamp the codes to [0, {top}], .clamp(0, 2**bits - 1)"
        _fail(f"{where}: a code is {bad:g}, outside [0, {top}]: {hint}")
    if hi == lo:
        return
    at_lo, at_hi = float(c[int(x.argmin())]), float(c[int(x.argmax())])
    off_zero = abs(zero - lo) > scale / 2
    if at_lo != 0:
        hint = (f"the zero point is {zero:.4g}, not the group's minimum {lo:.4g}" if off_zero
                else "(min - zero) / scale is 0, and it rounds to 0")
        _fail(f"{where}: the group's minimum got code {at_lo:g}, not 0: {hint}")
    if at_hi == top:
        return
    by_2_bits = abs(scale * 2**bits - (hi - lo)) < 1e-4 * (hi - lo)
    if at_hi == 0 and dtype == torch.uint8 and by_2_bits:
        hint = ("its code, 2**bits = 256, does not fit in a uint8 and wrapped to 0: the levels "
                "are 0 to 2**bits - 1 (scale (max - min) / (2**bits - 1)); clamp before .to()")
    elif off_zero:
        hint = (f"the zero point is {zero:.4g}, not the group's minimum {lo:.4g}: asymmetric "
                "min-max puts the zero point at the minimum")
    elif by_2_bits:
        hint = "the scale is (max - min) / 2**bits; it should be (max - min) / (2**bits - 1)"
    elif abs(scale - (hi - lo) / top) > 1e-4 * scale or at_hi != top - 1:
        hint = f"the scale should be (max - min) / {top} = {(hi - lo) / top:.4g}, not {scale:.4g}"
    else:
        hint = ("floor (or .to(int), which truncates) lost the top level: round to the nearest "
                "level, .round(), before converting")
    _fail(f"{where}: the group's maximum got code {at_hi:g}, not the top level {top}: {hint}")


def _bound_hint(x: Tensor, c: Tensor, scale: float, zero: float, bits: int) -> str:
    """The likely reason an error exceeds half a scale."""
    lo, hi = float(x.min()), float(x.max())
    exact = (x.double() - zero) / scale  # (N,): the level each number sits at
    if hi > lo and abs(scale * 2**bits - (hi - lo)) < 1e-4 * (hi - lo):
        return ("the scale is (max - min) / 2**bits, so the maximum needs level 2**bits and is "
                "clamped a whole scale below itself; divide by 2**bits - 1")
    if torch.equal(c, exact.floor().clamp(0, 2**bits - 1)) and not torch.equal(
            c, exact.round().clamp(0, 2**bits - 1)):
        return ("the codes are (x - zero) / scale rounded down (floor, or .to(int), which "
                "truncates): round to the nearest level, .round(), so no number moves more "
                "than half a scale")
    if abs(zero - lo) > scale / 2:
        return (f"the zero point is {zero:.4g}, not the group's minimum {lo:.4g}, so numbers "
                "below it are clipped")
    return "each code should be round((x - zero) / scale), clamped to [0, 2**bits - 1]"


def _against_kvlib(x: Tensor, c: Tensor, scale: float, zero: float, bits: int, where: str,
                   err: float) -> str:
    codes, s, z = quantize(x, bits, x.numel())  # float16 scale, rounded up; zero rounded down
    s, z = float(s), float(z)
    if x.max() > x.min() and abs(scale - s) > 2 * SCALE_ULP * s:
        _fail(f"{where}: scale {scale:.6g}, kvlib's {s:.6g} (the same in float16, rounded up): "
              "the scale is (max - min) / (2**bits - 1)")
    if abs(zero - z) > 2 * SCALE_ULP * abs(z) + 1e-6:
        _fail(f"{where}: zero point {zero:.6g}, kvlib's {z:.6g} (the minimum in float16, "
              "rounded down): the zero point is the group's minimum")
    same = float((codes.double() == c).double().mean())
    return (f"codes in [0, {2**bits - 1}], largest error {err:.3g} <= scale / 2 = "
            f"{scale / 2:.3g}; kvlib's float16 scale {s:.4g}, {same:.0%} of the codes equal")


def _few(t: Tensor, n: int = 4) -> str:
    shown = ", ".join(f"{float(v):.4g}" for v in t.flatten()[:n])
    return f"[{shown}{', ...' if t.numel() > n else ''}]"


# ---- the eviction rule -----------------------------------------------------------------------

Victims = Callable[[EvictCache], Tensor]
LENGTHS = (40, 96, 200)

# What a wrong rule usually gets wrong, as the options of _victims_by, and the hint to give (the
# first that gives the reader's slots wins: one part forgotten before both).
MISTAKES: list[tuple[dict, str]] = [
    ({"window": False}, "it picks tokens of the recent window: never pick positions > "
     "cache.seen - cache.recent (nor the sinks, positions < cache.n_sink)"),
    ({"sinks": False}, "it picks attention sinks: never pick positions < cache.n_sink (nor the "
     "recent window, positions > cache.seen - cache.recent)"),
    ({"sinks": False, "window": False}, "it picks sinks and recent tokens too: never pick "
     "positions < cache.n_sink nor the last cache.recent positions"),
    ({"shift": -1}, "its window holds one token too many: the window counts the token about to "
     "be written (position cache.seen), so keep positions > cache.seen - cache.recent"),
    ({"shift": 1}, "its window holds one token too few: keep positions > cache.seen - "
     "cache.recent (the new token, at cache.seen, is one of the window)"),
    ({"pick": "argmax"}, "it picks the token with the most attention: the victim is the one "
     "with the least, argmin"),
]


def _victims_by(cache: EvictCache, sinks: bool = True, window: bool = True, shift: int = 0,
                pick: str = "argmin") -> Tensor:
    """``EvictCache.victims`` with one of its parts changed: a mistake to recognise."""
    keep = torch.zeros_like(cache.positions, dtype=torch.bool)  # (B, H, S)
    if sinks:
        keep |= cache.positions < cache.n_sink
    if window:
        keep |= cache.positions > cache.seen - cache.recent + shift
    if pick == "argmax":
        return cache.scores.masked_fill(keep, float("-inf")).argmax(dim=-1)
    return cache.scores.masked_fill(keep, float("inf")).argmin(dim=-1)


def check_victims(fn: Victims, model: CausalLM, ids: Tensor, *, budget: int = 32,
                  n_sink: int = 4, lengths: Sequence[int] = LENGTHS,
                  verbose: bool = True) -> list[Check]:
    """Grade ``fn(cache) -> (B, H)``, the slot of one layer's ``EvictCache`` that the next token
    overwrites in each head, against ``EvictCache.victims``: ``model`` reads ``ids`` ``(1, T)``
    through an eviction cache (``budget``, ``n_sink``), and after each of ``lengths`` tokens
    every layer's cache is handed to ``fn``. The model is handed back as it was. Raises
    ``CacheCheckError`` with a hint at the first difference; returns the checks that passed."""
    lengths = sorted(lengths)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < lengths[-1]:
        _fail(f"check_victims reads one row of at least {lengths[-1]} tokens, ids (1, T); got "
              f"{tuple(ids.shape)}: pass a longer text or shorter lengths=")
    if lengths[0] <= budget:
        _fail(f"after {lengths[0]} tokens a cache of budget {budget} is not full yet and evicts "
              f"nothing: make every length more than {budget}")
    passed: list[Check] = []
    with preserved_state(model), torch.no_grad():
        model.set_kv_cache("evict", budget=budget, n_sink=n_sink)
        prefill(model, ids[:, : lengths[0]])
        for t in range(lengths[0], lengths[-1] + 1):
            if t in lengths:
                detail = _check_layers(fn, model.caches, t)
                passed.append(Check(f"after {t} tokens", detail))
                if verbose:
                    print(f"ok  after {t} tokens: {detail}")
            if t < lengths[-1]:
                model(ids[:, t : t + 1], use_cache=True)
    if verbose:
        print(f"the eviction rule passed all {len(passed)} checks")
    return passed


def _check_layers(fn: Victims, caches: list, length: int) -> str:
    for layer, cache in enumerate(caches):
        want = cache.victims()  # (B, H)
        scores, positions = cache.scores.clone(), cache.positions.clone()
        got = fn(cache)
        where = f"after {length} tokens, layer {layer}"
        if not (torch.equal(cache.scores, scores) and torch.equal(cache.positions, positions)):
            _fail(f"{where}: the function changed the cache's scores or positions in place: "
                  "use masked_fill (a copy), not masked_fill_")
        if not isinstance(got, Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            _fail(f"{where}: expected one slot index per sequence and head, (B, H) = "
                  f"{tuple(want.shape)}; got {shape}: argmin over the last dim, the slots")
        if got.is_floating_point():
            _fail(f"{where}: the slots are indices, integers (argmin returns them); got a "
                  f"{got.dtype} tensor")
        if not torch.equal(got, want):
            _fail(f"{where}: your slots {got.tolist()}, kvlib's {want.tolist()}: "
                  + _victims_hint(cache, got, want))
    return f"the same slot as kvlib's in all {len(caches)} layers x {want.shape[1]} heads"


def _victims_hint(cache: EvictCache, got: Tensor, want: Tensor) -> str:
    if torch.equal(got, cache.positions.gather(-1, want[..., None].long())[..., 0]):
        return "those are the positions the slots hold: return the slot index, not its position"
    for options, hint in MISTAKES:
        if torch.equal(got, _victims_by(cache, **options)):
            return hint
    return ("among the slots that hold neither a sink (position < n_sink) nor one of the last "
            "recent positions (position > seen - recent), pick the least score")
