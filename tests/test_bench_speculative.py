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
    assert len(speculative_lines(d)) == 4 + len(rows)
