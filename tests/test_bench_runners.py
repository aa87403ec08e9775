"""kvlib.bench.runners: the transformers twin holds kvlib's weights and, driven by the same loop,
chooses the same greedy tokens."""

import pytest
import torch

import kvlib
from kvlib.bench import HF_KINDS, PROMPT, HFRunner, hf_twin, time_run
from kvlib.hf.gpt2 import name_table

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_same_greedy_tokens_as_kvlib(bench_run):
    res = {r["strategy"]: r for r in bench_run[2]["results"]}
    assert res["prealloc"]["tokens_ref"] is None  # the reference
    for s in ("none", "concat", "hf-dynamic", "hf-static"):
        assert res[s]["tokens_ref"] == "prealloc" and res[s]["tokens_match"] is True, s
    assert isinstance(res["sliding"]["tokens_match"], bool)  # may differ past the window


def test_hf_twin_has_identical_weights_and_tokens(make_model):
    model = make_model("tiny", seed=3)
    hf = hf_twin(model)
    table = name_table(model.cfg.n_layers)
    hf_sd, sd = hf.state_dict(), model.state_dict()
    assert len(table) == len(sd) - 1  # every weight but the tied head
    for name, (hf_name, transposed) in table.items():
        mine = sd[name].t() if transposed else sd[name]
        assert torch.equal(hf_sd[hf_name], mine), name
    assert torch.equal(hf_sd["lm_head.weight"], sd["wte.weight"])
    idx = torch.tensor([PROMPT, PROMPT[::-1]])
    ref = kvlib.generate(model, idx, 20, cache="prealloc").tokens[:, 6:]
    for kind in HF_KINDS:
        run = time_run(HFRunner(hf, kind), idx, 20)
        assert torch.equal(run["tokens"], ref), kind
        assert len(run["steps"]) == 19 and run["wall"] >= run["prefill"] + sum(run["steps"])


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_hf_twin_of_the_llama_family_gives_the_same_tokens(make_llama, preset):
    model = make_llama(preset, seed=3)
    hf = hf_twin(model)
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if preset == "tiny-qwen3"
                                 else "LlamaForCausalLM")
    idx = torch.tensor([PROMPT, PROMPT[::-1]])
    ref = kvlib.generate(model, idx, 20, cache="prealloc").tokens[:, 6:]
    for kind in HF_KINDS:
        run = time_run(HFRunner(hf, kind), idx, 20)
        assert torch.equal(run["tokens"], ref), kind
    # the HF caches hold the same kv heads as kvlib's: 2 tensors x layers x B x H_kv x T x D
    cfg = model.cfg
    assert HFRunner(hf, "hf-dynamic").cache_nbytes() == 0  # nothing before a run
    runner = HFRunner(hf, "hf-dynamic")
    time_run(runner, idx, 20)
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * idx.shape[0]
    assert runner.cache_nbytes() == per_token * (idx.shape[1] + 19)
