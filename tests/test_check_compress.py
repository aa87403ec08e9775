"""kvlib.check_quantizer and kvlib.check_victims (chapter 10's graders): the reference solutions
pass, each typical wrong answer is caught with its hint, and the model is handed back as it was.
Also ``kvlib.measure.attention_output_errors``, the measurement chapter 10's section 1 reads."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvlib
from kvlib import CacheCheckError, check_quantizer, check_victims
from kvlib.caches import dequantize, quantize
from kvlib.measure import attention_inputs, attention_output_errors

# ---- check_quantizer -------------------------------------------------------------------------


def quantizer(levels: Callable[[int], int] = lambda b: 2**b - 1, *, rounding: str = "round",
              clamp: bool = True, zero: Callable | None = None, guard: bool = True,
              dtype: torch.dtype = torch.uint8) -> Callable:
    """The exercise's ``my_quantize``, right by default; each option is one classic mistake."""

    def my_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, float]:
        z = x.min().item() if zero is None else zero(x)
        scale = (x.max().item() - x.min().item()) / levels(bits)
        if guard:
            scale = max(scale, 1e-12)
        q = (x - z) / scale
        q = {"round": q.round(), "floor": q.floor(), "none": q}[rounding]
        if clamp:
            q = q.clamp(0, 2**bits - 1)
        return q.to(dtype), scale, z

    return my_quantize


def my_dequantize(codes: torch.Tensor, scale: float, zero: float) -> torch.Tensor:
    return codes.float() * scale + zero


def test_the_reference_quantizer_passes_every_check(capsys):
    passed = check_quantizer(quantizer(), my_dequantize)
    assert len(passed) == 12  # 8, 4 and 2 bits x four groups
    out = capsys.readouterr().out
    assert out.count("\nok  ") + out.startswith("ok  ") == 12
    assert "ok  int4, a constant group" in out and "passed all 12 checks" in out


def test_kvlib_own_quantize_passes_as_a_reader_would_call_it():
    def theirs(x, bits):
        codes, scale, zero = quantize(x, bits, x.numel())
        return codes, scale.float().item(), zero.float().item()

    check_quantizer(theirs, lambda c, s, z: dequantize(c, torch.tensor([s]), torch.tensor([z]),
                                                       c.numel()), verbose=False)


def test_a_quantizer_without_a_clamp_still_passes():  # round and 2**bits - 1 never leave range
    check_quantizer(quantizer(clamp=False), my_dequantize, verbose=False)


@pytest.mark.parametrize("make,hint", [
    (quantizer(lambda b: 2**b), "(max - min) / 2**bits"),
    (quantizer(lambda b: 2**b, clamp=False, dtype=torch.int64), "0 to 2**bits - 1"),
    (quantizer(lambda b: 2**b, clamp=False), "does not fit in a uint8 and wrapped to 0"),
    (quantizer(rounding="floor"), "round to the nearest level"),
    (quantizer(rounding="none"), "truncates"),  # .to(uint8) alone drops the fraction
    (quantizer(rounding="none", dtype=torch.float32), "not whole numbers"),
    (quantizer(zero=lambda x: 0.0), "not the group's minimum"),
    (quantizer(zero=lambda x: 0.0, clamp=False, dtype=torch.int64), "above the group's minimum"),
    (quantizer(zero=lambda x: x.mean().item()), "not the group's minimum"),
    (quantizer(guard=False), "divides by zero"),
    (quantizer(lambda b: 2**b - 2), "the scale should be (max - min) /"),
], ids=["levels 2**bits", "levels, no clamp", "levels, uint8 wraps", "floor", "truncating cast",
        "no rounding", "zero at 0", "zero at 0, no clamp", "zero at the mean",
        "constant group", "scale too large"])
def test_a_typical_mistake_is_caught_with_its_hint(make, hint):
    with pytest.raises(CacheCheckError, match="int8|int4|int2") as err:
        check_quantizer(make, my_dequantize, verbose=False)
    assert hint in str(err.value)


@pytest.mark.parametrize("dequantize_fn", [lambda c, s, z: c.float() * s,
                                           lambda c, s, z: (c.float() - z) * s],
                         ids=["forgets the zero", "subtracts the zero"])
def test_a_wrong_dequantizer_is_named(dequantize_fn):
    with pytest.raises(CacheCheckError, match=r"should return codes \* scale \+ zero"):
        check_quantizer(quantizer(), dequantize_fn, verbose=False)


def test_the_constant_group_is_where_a_zero_scale_fails():
    with pytest.raises(CacheCheckError, match="a constant group: scale 0"):
        check_quantizer(quantizer(guard=False), my_dequantize, verbose=False)


@pytest.mark.parametrize("bad,message", [
    (lambda x, bits: x, "must return the tuple"),
    (lambda x, bits: (x[:3].round(), 1.0, 0.0), "of the group's shape"),
    (lambda x, bits: (x.round(), torch.ones(2), 0.0), "scale must be one number"),
])
def test_a_quantizer_of_the_wrong_form_says_what_to_return(bad, message):
    with pytest.raises(CacheCheckError, match=message):
        check_quantizer(bad, my_dequantize, verbose=False)


# ---- check_victims ---------------------------------------------------------------------------


def my_victims(cache: kvlib.EvictCache) -> torch.Tensor:
    newest = cache.seen
    kept = (cache.positions < cache.n_sink) | (cache.positions > newest - cache.recent)
    return cache.scores.masked_fill(kept, float("inf")).argmin(dim=-1)


def rule(sinks: bool = True, window: bool = True, shift: int = 0) -> Callable:
    def victims(c: kvlib.EvictCache) -> torch.Tensor:
        keep = torch.zeros_like(c.positions, dtype=torch.bool)
        if sinks:
            keep |= c.positions < c.n_sink
        if window:
            keep |= c.positions > c.seen - c.recent + shift
        return c.scores.masked_fill(keep, float("inf")).argmin(dim=-1)

    return victims


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return kvlib.LlamaModel(kvlib.LlamaConfig.from_preset("tiny-llama")).eval()


@pytest.fixture(scope="module")
def text():
    return torch.randint(0, 50257, (1, 120), generator=torch.Generator().manual_seed(1))


LENGTHS = (40, 64, 100)


def test_the_reference_rule_passes_and_the_model_is_handed_back(llama, text, capsys):
    llama.set_kv_cache("concat")
    before = list(llama.caches)
    passed = check_victims(my_victims, llama, text, lengths=LENGTHS)
    assert [c.name for c in passed] == [f"after {n} tokens" for n in LENGTHS]
    out = capsys.readouterr().out
    assert "ok  after 100 tokens: the same slot as kvlib's in all 2 layers x 2 heads" in out
    assert list(llama.caches) == before and isinstance(before[0], kvlib.ConcatCache)


def test_the_rule_passes_on_gpt2_too(make_model, text):
    check_victims(my_victims, make_model(), text, lengths=LENGTHS, verbose=False)


@pytest.mark.parametrize("fn,hint", [
    (rule(window=False), "it picks tokens of the recent window"),
    (rule(shift=-1), "one token too many"),
    (rule(shift=1), "one token too few"),
    (lambda c: c.scores.masked_fill((c.positions < c.n_sink)
                                    | (c.positions > c.seen - c.recent),
                                    float("-inf")).argmax(dim=-1), "argmin"),
    (lambda c: c.positions.gather(-1, my_victims(c)[..., None].long())[..., 0],
     "return the slot index, not its position"),
    (lambda c: c.scores.masked_fill_(c.positions < c.n_sink, float("inf")).argmin(dim=-1),
     "in place"),
    (lambda c: my_victims(c).float(), "integers"),
    (lambda c: my_victims(c)[0], "(B, H)"),
], ids=["no window", "window too long", "window too short", "argmax", "positions",
        "in place", "float", "shape"])
def test_a_wrong_rule_is_caught_with_its_hint(llama, text, fn, hint):
    with pytest.raises(CacheCheckError, match="after 40 tokens|after 64 tokens|after 100") as e:
        check_victims(fn, llama, text, lengths=LENGTHS, verbose=False)
    assert hint in str(e.value)


def test_on_chapter_10s_run_the_rule_passes_and_forgotten_sinks_are_caught():
    """mini-llama on the held-out code of chapter 10's section 5: there the sinks matter (on
    random weights the first tokens gather so much attention that they are never the least)."""
    model = kvlib.load_model("mini-llama")
    part = kvlib.held_out("mini-llama")[:, 13 * 256 : 14 * 256]
    assert len(check_victims(my_victims, model, part, verbose=False)) == 3
    with pytest.raises(CacheCheckError, match="it picks attention sinks"):
        check_victims(rule(sinks=False), model, part, verbose=False)


def test_a_rule_without_sinks_or_window_is_caught(llama, text):
    with pytest.raises(CacheCheckError, match="your slots .* kvlib's"):
        check_victims(lambda c: c.scores.argmin(dim=-1), llama, text, lengths=LENGTHS,
                      verbose=False)


def test_bad_arguments_say_what_to_pass(llama, text):
    with pytest.raises(CacheCheckError, match="at least 200 tokens"):
        check_victims(my_victims, llama, text)  # the default lengths reach 200
    with pytest.raises(CacheCheckError, match="not full yet"):
        check_victims(my_victims, llama, text, lengths=(20, 60))


# ---- attention_output_errors -----------------------------------------------------------------


def test_attention_inputs_are_the_layers_softmax_and_values(llama, text):
    ids = text[:, :64]
    weights, values = attention_inputs(llama, ids, layer=1)
    assert weights.shape == (4, 64, 64) and values.shape == (2, 64, 16)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 64))
    assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # causal
    _, cached = kvlib.measure.cached_keys_values(llama, ids, layer=1)
    torch.testing.assert_close(values, cached)


def test_output_errors_shrink_with_bits_and_vanish_on_exact_levels(llama, text):
    weights, values = attention_inputs(llama, text[:, :64], layer=0)
    e8, e4 = (attention_output_errors(weights, values, b, 16) for b in (8, 4))
    assert set(e4) == {"values per token", "values per channel"}
    assert all(0 < e8[k] < e4[k] for k in e4)
    step = 1.0 + torch.arange(64.0).remainder(3)[:, None]  # (T, 1): 1, 2 or 3
    levels = (torch.arange(16.0) * step).repeat(2, 1, 1)  # (H_kv, T, D): each token on levels
    exact = attention_output_errors(weights, levels, 4, 16)
    assert exact["values per token"] < 1e-6 < exact["values per channel"]


def test_attention_inputs_refuse_a_model_without_the_parts(make_model, text):
    with pytest.raises(TypeError, match="Llama-style model"):
        attention_inputs(make_model(), text[:, :16])
