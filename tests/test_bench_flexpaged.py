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


def test_every_way_gives_the_gathers_output_and_the_report_names_the_fastest():
    d = flex_paged("tiny-llama", batch=2, length=40, block_size=16, rounds=2)
    assert d["max_abs_diff"] < 1e-5
    assert d["gather_us"] > 0 and d["flex_us"] > 0 and d["compile_s"] > 0
    if d.get("kernel_us") is not None:  # built where there is a C compiler
        assert d["kernel_max_abs_diff"] < 1e-5
    ways = {"gather": "the gather", "flex": "FlexAttention", "kernel": "the kernel"}
    fastest = min((k for k in ways if d.get(f"{k}_us")), key=lambda k: d[f"{k}_us"])
    text = "\n".join(flex_paged_lines(d))
    assert f"Fastest here: {ways[fastest]}." in text and "tiny-llama" in text


def test_the_report_reads_a_run_without_the_kernel():
    d = flex_paged("tiny-llama", batch=2, length=40, block_size=16, rounds=2)
    d.pop("kernel_us", None)
    text = "\n".join(flex_paged_lines(d))
    assert "paged_attention.c" not in text and "Fastest here" in text
