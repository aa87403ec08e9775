"""kvlib.bench.flexpaged: both ways of paged attention give the attention of the unpaged keys."""

import torch
import torch.nn.functional as F

from kvlib.bench.flexpaged import _gather, _paged_inputs, flex_paged, flex_paged_lines


def test_the_gather_reads_each_rows_own_blocks():
    B, H_kv, H, D, L, bs = 3, 2, 4, 8, 37, 16  # the last block of each row part-filled
    x = _paged_inputs(B, H_kv, H, D, L, bs)
    q = x["q"].view(B, H_kv, H // H_kv, D)
    want = F.scaled_dot_product_attention(q, x["keys"], x["values"]).view(B, H, 1, D)
    torch.testing.assert_close(_gather(x, H_kv), want)


def test_flexattention_gives_the_gathers_output_and_the_report_says_which_was_faster():
    d = flex_paged("tiny-llama", batch=2, length=40, block_size=16, rounds=2)
    assert d["max_abs_diff"] < 1e-5
    assert d["gather_us"] > 0 and d["flex_us"] > 0 and d["compile_s"] > 0
    text = "\n".join(flex_paged_lines(d))
    verdict = "the gather stays" if d["flex_us"] > d["gather_us"] else "FlexAttention's paged "
    assert verdict in text and "tiny-llama" in text
