"""The speculative-decoding benchmark runs and reports every field (never timed)."""

import pytest

from kvlib.bench.speculative import speculative, speculative_lines


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_speculative_bench_reports_every_variant(one_thread):
    d = speculative("mini-llama", None, prompts=1, prompt_len=24, new_tokens=6, repeats=1,
                    warmup=0, hf=True, progress=False)
    rows = d["variants"]
    assert list(rows) == ["plain", "lookup", "hf plain", "hf lookup"]
    assert rows["lookup"]["same_as_plain"] == 1  # greedy: the tokens of plain decoding
    assert rows["plain"]["vs_plain"] == 1.0 and "vs_hf" in rows["lookup"]
    assert 0 <= (rows["lookup"]["acceptance"] or 0) <= 1
    assert len(speculative_lines(d)) == 6 + len(rows)


def test_latent_bench_times_both_modes_and_checks_their_tokens(one_thread):
    from kvlib.bench.latent import latent, latent_lines
    from kvlib.models import DeepseekConfig

    d = latent((8, 16), steps=2, repeats=1, warmup=0,
               cfg=DeepseekConfig.from_preset("tiny-deepseek"))
    assert [r["context"] for r in d["rows"]] == [8, 16]
    assert all(r["same_tokens"] and r["naive_ms"] > 0 and r["absorb_ms"] > 0 for r in d["rows"])
    assert d["rows"][1]["cache_bytes"] > d["rows"][0]["cache_bytes"]
    assert len(latent_lines(d)) == 6 + 2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_report_says_what_a_round_costs_and_must_commit(one_thread):
    d = speculative("mini-llama", "mini-llama-draft", prompts=1, prompt_len=24, new_tokens=6,
                    draft_tokens=3, repeats=1, warmup=0, hf=False, progress=False)
    c = d["costs"]
    assert set(c) == {"model_step_ms", "draft_step_ms", "verify_ms"}
    assert all(v > 0 for v in c.values())
    from kvlib.bench.speculative import round_cost

    assert round_cost(d, "lookup") == pytest.approx(c["verify_ms"] / c["model_step_ms"])
    assert round_cost(d, "draft model") == pytest.approx(
        (3 * c["draft_step_ms"] + c["verify_ms"]) / c["model_step_ms"])
    text = "\n".join(speculative_lines(d))
    assert "Why, measured" in text and "| draft model |" in text.split("Why, measured")[1]
