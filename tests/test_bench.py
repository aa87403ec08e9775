"""kvlib.bench: everything that can be checked without trusting a timer.

One small run of the CLI (tiny model, a few tokens, with transformers) feeds the schema, token and
report tests; the floor and the HF twin are checked directly.
"""

import json
import math

import pytest
import torch
from conftest import make_model

import kvlib
from kvlib import bench
from kvlib.hf.gpt2 import name_table

transformers = pytest.importorskip("transformers")

N, WINDOW, LENGTHS = 12, 8, (16, 32)
STRATEGIES = ["none", "concat", "prealloc", "sliding"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench.main(["run", "--models", "tiny", "--strategies", ",".join(STRATEGIES), "--new-tokens",
                str(N), "--repeats", "2", "--window", str(WINDOW), "--compare", "hf",
                "--no-cache-lengths", ",".join(map(str, LENGTHS)), "--overhead",
                "--overhead-tokens", "6", "--floor-samples", "4", "--threads", "0",
                "--no-progress", "--out", str(out / "results.json"), "--plots", str(out)])
    return out, json.loads((out / "results.json").read_text())


def test_json_schema(run):
    _, data = run
    assert data["schema"] == bench.SCHEMA
    assert data["command"].startswith("python -m kvlib.bench run --models tiny")
    for key, kind in {"torch": str, "python": str, "cpu_model": str, "cpu_count": int,
                      "threads": int, "device": str, "transformers": str}.items():
        assert isinstance(data["environment"][key], kind), key
    assert data["environment"]["threads"] == 1
    assert isinstance(data["duration_s"], float) and data["duration_s"] > 0
    assert sorted(r["strategy"] for r in data["results"]) == sorted(STRATEGIES + list(
        bench.HF_KINDS))
    for r in data["results"]:
        assert (r["model"], r["new_tokens"], r["batch"], r["dtype"], r["device"], r["repeats"]) \
            == ("tiny", N, 1, "float32", "cpu", 2)
        assert r["backend"] == ("hf" if r["strategy"].startswith("hf-") else "kvlib")
        for key in ("prefill_ms", "decode_tokens_per_s", "e2e_tokens_per_s", "wall_s"):
            assert set(r[key]) == {"median", "q1", "q3", "min", "max", "n"}, key
            assert r[key]["min"] <= r[key]["median"] <= r[key]["max"], key
        assert {"p50", "p90", "p99"} <= set(r["step_ms"])
        assert r["step_ms"]["p50"] <= r["step_ms"]["p90"] <= r["step_ms"]["p99"]
        assert len(r["step_curve_ms"]) == N - 1 and all(x > 0 for x in r["step_curve_ms"])
        assert r["floor_ratio"] > 0 and isinstance(r["cache_nbytes"], int)
        assert [a["seq_len"] for a in r["allocations"]] == [6 + s for s in bench.alloc_steps(N)]
        assert len(r["allocations"]) == 2
        assert all(a["count"] > 0 and a["bytes"] > 0 for a in r["allocations"])
    for f in data["floor"]:
        assert f["weight_nbytes"] == bench.floor_nbytes(make_model("tiny")) and f["ms"]["n"] >= 4
    assert {f["kv_len"] for f in data["floor"]} == {0, 6 + N}
    assert [x["length"] for x in data["no_cache"]] == list(LENGTHS)
    assert all(x["no_cache_ms"]["n"] == 3 for x in data["no_cache"])
    assert data["no_cache"][0]["cached_ms"] > 0  # length 16 lies inside the 18-token run
    assert data["no_cache"][1]["cached_ms"] is None  # 32 does not: no made-up number
    ov = data["overhead"]
    assert set(ov["twin_step_ms"]) == {"concat", "prealloc", "sliding", *bench.HF_KINDS}
    assert ov["profile"]["top"] and ov["profile"]["wall_ms"] > 0
    gap = ov["gap"]
    assert gap["same_logits"] and gap["ops_per_step"]["layernorm"] == 2 * 2 + 1  # tiny: 2 layers
    assert list(gap["ms"]) == ["kvlib step (modules)", "bare functional step",
                               *(f"without {p}" for p in bench.GAP_PARTS),
                               "matrix products only", "floor"]
    assert all(v > 0 for v in gap["ms"].values())
    json.dumps(data, allow_nan=True)  # plain JSON types only


def test_cache_bytes_held(run):
    _, data = run
    cfg = kvlib.GPTConfig.from_preset("tiny")
    per_token = cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * 4  # K and V, float32, batch 1
    held = {r["strategy"]: r["cache_nbytes"] for r in data["results"]}
    # N tokens: the prompt (6) and N - 1 decoded tokens went through the cache
    assert held == {"none": 0, "concat": (6 + N - 1) * per_token, "prealloc": (6 + N) * per_token,
                    "sliding": WINDOW * per_token, "hf-dynamic": (6 + N - 1) * per_token,
                    "hf-static": (6 + N) * per_token}


def test_same_greedy_tokens_as_kvlib(run):
    _, data = run
    res = {r["strategy"]: r for r in data["results"]}
    assert res["prealloc"]["tokens_ref"] is None  # the reference
    for s in ("none", "concat", "hf-dynamic", "hf-static"):
        assert res[s]["tokens_ref"] == "prealloc" and res[s]["tokens_match"] is True, s
    assert isinstance(res["sliding"]["tokens_match"], bool)  # may differ past the window


def test_allocations_grow_with_concat_only(run):
    _, data = run
    cfg = kvlib.GPTConfig.from_preset("tiny")
    per_token = cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * 4
    res = {r["strategy"]: r["allocations"] for r in data["results"]}
    (a, b) = res["concat"]
    # every step's torch.cat copies the whole cache into new tensors
    assert b["bytes"] - a["bytes"] >= (b["seq_len"] - a["seq_len"]) * per_token
    (a, b) = res["prealloc"]
    assert abs(b["bytes"] - a["bytes"]) < (b["seq_len"] - a["seq_len"]) * per_token
    assert a["count"] == b["count"]


def test_floor_reads_every_weight_once():
    for model in (make_model("tiny"), make_model("tiny", n_layers=3, vocab_size=500)):
        mats = bench.floor_weights(model)
        assert len(mats) == 4 * model.cfg.n_layers + 1
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert {id(m.weight) for m in linears} == {id(w) for w, _ in mats}  # head once: tied
        assert mats[-1][0] is model.wte.weight
        # what a decode step needs in full: every parameter except the position table (one row
        # per token) and the LayerNorms (a few vectors)
        skip = {id(model.wpe.weight)} | {id(p) for m in model.modules()
                                         if isinstance(m, torch.nn.LayerNorm)
                                         for p in m.parameters()}
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                           if id(p) not in skip)
        assert bench.floor_nbytes(model) == weight_bytes
        C, V, L = model.cfg.emb_dim, model.cfg.vocab_size, model.cfg.n_layers
        assert weight_bytes == 4 * (L * (12 * C * C + 9 * C) + V * C)


def test_floor_step_is_a_chain_over_the_weights():
    model = make_model("tiny")
    cfg = model.cfg
    chain = bench.FloorChain.of(model)
    assert chain.mats == bench.floor_weights(model) and chain.n_heads == cfg.n_heads
    assert chain.attend_at == {4 * i: i for i in range(cfg.n_layers)}  # after each c_attn
    x = torch.randn(2, cfg.emb_dim)
    kv = [(torch.randn(2, cfg.n_heads, 5, cfg.head_dim),) * 2 for _ in range(cfg.n_layers)]
    with torch.no_grad():
        out = bench.floor_step(chain, x, kv)
        assert out.shape == (2, cfg.vocab_size)
        assert not torch.equal(out, bench.floor_step(chain, x))  # the KV reads feed the chain
    f = bench.Floor(model, batch=1, kv_len=7)
    f.measure(2)
    assert len(f.times) == 2 and f.kv_nbytes == cfg.n_layers * 2 * 7 * cfg.emb_dim * 4


@torch.inference_mode()
def test_functional_step_is_the_decode_step():
    model = make_model("gpt2", n_layers=2, emb_dim=48, n_heads=4, vocab_size=300)
    prompt = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    tok = torch.tensor([[7], [250]])
    model.set_kv_cache("prealloc", max_len=10)
    model(prompt, use_cache=True)
    want = kvlib.decode_one(model, tok)  # writes slot 9 and moves the counters to 10
    got = bench.functional_step(model, tok, kv_len=9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.pos == 10 and all(c.get_seq_length() == 10 for c in model.caches)
    for part in bench.GAP_PARTS:  # each kind of op left out changes the answer, shapes stay
        other = bench.functional_step(model, tok, 9, frozenset({part}))
        assert other.shape == want.shape and not torch.allclose(other, want), part


def test_hf_twin_has_identical_weights_and_tokens():
    model = make_model("tiny", seed=3)
    hf = bench.hf_twin(model)
    table = name_table(model.cfg.n_layers)
    hf_sd, sd = hf.state_dict(), model.state_dict()
    assert len(table) == len(sd) - 1  # every weight but the tied head
    for name, (hf_name, transposed) in table.items():
        mine = sd[name].t() if transposed else sd[name]
        assert torch.equal(hf_sd[hf_name], mine), name
    assert torch.equal(hf_sd["lm_head.weight"], sd["wte.weight"])
    idx = torch.tensor([bench.PROMPT, bench.PROMPT[::-1]])
    ref = kvlib.generate(model, idx, 20, cache="prealloc").tokens[:, 6:]
    for kind in bench.HF_KINDS:
        got = bench.time_run(bench.HFRunner(hf, kind), idx, 20)["tokens"]
        assert torch.equal(got, ref), kind


def _synthetic(step: dict[str, float], tps: dict[str, float], **extra) -> dict:
    rows = []
    for (strategy, n), t in tps.items():
        r = {"model": "gpt2", "dtype": "float32", "batch": 1, "device": "cpu", "new_tokens": n,
             "strategy": strategy, "backend": "hf" if strategy.startswith("hf") else "kvlib",
             "decode_tokens_per_s": {"median": t}, "step_ms": {"p50": 1000 / t},
             "floor_ratio": step.get((strategy, n), math.nan), "first_ms": 10.0,
             "last_ms": 11.0 if strategy == "prealloc" else 20.0, "end_floor_kv_ratio": 1.1,
             "wall_s": {"median": 1.0}}
        rows.append(r)
    return {"results": rows, "environment": {"threads": 2}, "floor": [], **extra}


def test_targets_are_judged_from_the_numbers():
    data = _synthetic({("prealloc", 200): 1.1},
                      {("concat", 200): 30, ("prealloc", 200): 37, ("hf-dynamic", 200): 30,
                       ("prealloc", 1000): 30, ("hf-dynamic", 1000): 25, ("concat", 1000): 20})
    got = [(round(t["value"], 3), t["met"]) for t in bench.targets(data)]
    assert got == [(1.233, True),  # 200 tokens: fastest cache (prealloc) vs DynamicCache
                   (1.1, True),  # its step vs the floor
                   (1.2, False),  # 1000 tokens: prealloc vs DynamicCache, needs 1.3
                   (1.1, True),  # step at the end vs floor + KV
                   (1.1, True),  # flat: last 100 / first 100
                   (2.0, True)]  # concat's growth, shown
    assert bench.targets(data)[0]["detail"] == "prealloc"
    # nothing measured: "not measured", never a pass
    empty = bench.targets({"results": [], "environment": {"threads": 2}, "floor": []})
    assert all(t["met"] is None for t in empty)


def test_report_and_plots(run, capsys):
    out, data = run
    text = bench.report(data, str(out))
    for needle in ("## Targets", "## Decode speed", "## Floor and floor + KV",
                   "## Cache vs no cache, per step", "## Per-step overhead", "hf-static",
                   "## Where the time above the floor goes", "| without gelu |",
                   "No GPU on this machine", data["command"], "![Decode step latency"):
        assert needle in text, needle
    for name, _ in bench.PLOTS:
        png = out / name
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000, name
    bench.main(["report", str(out / "results.json"), "--plots-dir", str(out)])
    assert capsys.readouterr().out.strip() == text.strip()


def test_cli_refuses_what_it_cannot_run():
    with pytest.raises(SystemExit, match="exceed"):
        bench.Bench([bench.Suite(["tiny"], ["prealloc"], [300])], progress=False).run()
    with pytest.raises(SystemExit, match="unknown strategy"):
        bench.Bench([bench.Suite(["tiny"], ["paged"], [4])], progress=False).run()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA"):
            bench.Bench([bench.Suite(["tiny"], ["prealloc"], [4], devices=["cuda"])],
                        progress=False).run()


def test_compile_verdict_follows_the_numbers():
    def record(eager: float, compiled: float) -> dict:
        ms = lambda m: {"median": m, "q1": m, "q3": m}  # noqa: E731
        return {"model": "gpt2", "new_tokens": 100, "threads": 2, "first_run_s": 240.0,
                "eager_step_ms": ms(eager), "compiled_step_ms": ms(compiled), "same_tokens": True}

    assert "does not pay" in bench.compile_text(record(31.0, 30.5))
    assert "ships no compile path" in bench.compile_text(record(31.0, 32.0))
    assert "pays off: 6.00 ms" in bench.compile_text(record(31.0, 25.0))


def test_lockstep_runs_the_three_in_turn(tmp_path):
    out = tmp_path / "lockstep.json"
    bench.main(["lockstep", "--model", "tiny", "--new-tokens", "8", "--repeats", "2",
                "--threads", "0", "--no-progress", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["schema"] == bench.SCHEMA + "/lockstep" and d["command"].startswith(
        "python -m kvlib.bench lockstep --model tiny")
    (r,) = d["runs"]
    assert r["new_tokens"] == 8 and len(r["repeats"]) == 2
    assert r["same_tokens"] is True  # kvlib's prealloc and DynamicCache: the same greedy tokens
    for rep in r["repeats"]:
        assert len(rep["kvlib_ms"]) == len(rep["hf_ms"]) == len(rep["floor_ms"]) == 7
        assert sorted(rep["order"]) == ["floor", "hf", "kvlib"]
    assert [rep["order"][0] for rep in r["repeats"]] == ["kvlib", "hf"]  # rotated per repeat
    for key in ("kvlib_over_hf_tokens_per_s", "step_over_floor", "flatness"):
        assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"], key
    data = {**run_like_data(), "lockstep": d}
    text = bench.report(data)
    assert "## Lockstep" in text and "| 8 | 2 |" in text and d["command"] in text


def run_like_data() -> dict:
    data = _synthetic({}, {})
    return {**data, "targets": bench.targets(data), "created": "now", "duration_s": 60.0,
            "command": "python -m kvlib.bench run",
            "environment": {**data["environment"], "cpu_model": "cpu", "cpu_count": 2,
                            "torch": "2", "python": "3", "transformers": "5", "platform": "x",
                            "gpu": None}, "no_cache": [], "overhead": None}


def test_lockstep_summary_cancels_drift_per_floor_step():
    drift = [1 + i / 100 for i in range(300)]  # the machine slows by 3x over the run
    rep = {"kvlib_ms": [2 * d for d in drift], "hf_ms": [3 * d for d in drift],
           "floor_ms": drift, "same_tokens": True}
    s = bench.lockstep_summary([rep])
    assert s["kvlib_over_hf_tokens_per_s"]["median"] == pytest.approx(1.5)
    assert s["step_over_floor"]["median"] == pytest.approx(2.0)
    assert s["flatness"]["median"] > 2  # raw: the drift shows up as growth
    assert s["flatness_per_floor"]["median"] == pytest.approx(1.0)  # per floor step: flat


def test_lockstep_targets_are_judged_from_the_numbers():
    def run(n: int, **medians: float) -> dict:
        return {"new_tokens": n, **{k: {"median": v} for k, v in medians.items()}}

    d = {"strategy": "prealloc", "runs": [
        run(200, kvlib_over_hf_tokens_per_s=1.21, step_over_floor=1.19),
        run(1000, kvlib_over_hf_tokens_per_s=1.28, flatness_per_floor=1.1)]}
    got = [(t["value"], t["met"]) for t in bench.lockstep_targets(d)]
    assert got == [(1.21, True), (1.19, False), (1.28, False), (1.1, True)]
    assert all("lockstep" in t["target"] for t in bench.lockstep_targets(d))
    d["runs"] = d["runs"][:1]  # no 1000-token run: not measured, never a pass
    assert [t["met"] for t in bench.lockstep_targets(d)][2:] == [None, None]


class _GQAAttention(kvlib.models.CachedAttention):
    """Llama-style attention: separate q/k/v/o projections, no biases, 2 key/value heads for 4
    query heads, and 4 x 16 = 64 query features from a 32-wide stream (as in Qwen3)."""

    def __init__(self, width: int = 32, heads: int = 4, kv_heads: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.shape = heads, kv_heads, dim
        self.q_proj = torch.nn.Linear(width, heads * dim, bias=False)
        self.k_proj = torch.nn.Linear(width, kv_heads * dim, bias=False)
        self.v_proj = torch.nn.Linear(width, kv_heads * dim, bias=False)
        self.o_proj = torch.nn.Linear(heads * dim, width, bias=False)

    def forward(self, x: torch.Tensor, use_cache: bool) -> torch.Tensor:
        (B, T, _), (H, H_kv, D) = x.shape, self.shape
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H_kv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H_kv, D).transpose(1, 2)
        y = kvlib.models.attend(q, k, v, self.kv_cache if use_cache else None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class _GQABlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _GQAAttention()
        self.gate_proj = torch.nn.Linear(32, 48, bias=False)
        self.up_proj = torch.nn.Linear(32, 48, bias=False)
        self.down_proj = torch.nn.Linear(48, 32, bias=False)

    def forward(self, x: torch.Tensor, use_cache: bool) -> torch.Tensor:
        x = x + self.self_attn(x, use_cache)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ToyLlama(kvlib.CausalLM):
    """A two-layer Llama-shaped CausalLM with an untied head, to check the floor on a family
    other than GPT-2."""

    hard_context = False
    # the floor reads n_heads here; the key/value heads and head dim (16, not 32 / 4) come from
    # the model's caches
    cfg = kvlib.GPTConfig(vocab_size=300, context_length=64, emb_dim=32, n_heads=4, n_layers=2)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(300, 32)
        self.layers = torch.nn.ModuleList(_GQABlock() for _ in range(2))
        self.lm_head = torch.nn.Linear(32, 300, bias=False)  # untied

    def forward(self, idx, use_cache=False, last_only=False, check_ids=True):
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, use_cache)
        self.pos += idx.shape[1] if use_cache else 0
        return self.lm_head(x[:, -1:] if last_only else x)


def test_floor_of_a_llama_shaped_model():
    model = ToyLlama().eval()
    mats = bench.floor_weights(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(mats) == 7 * 2 + 1 and names[-1] == "lm_head"  # q k v o gate up down, head
    assert mats[-1][0] is model.lm_head.weight and all(b is None for _, b in mats)
    assert bench.attention_points(model) == {0: 0, 7: 1}  # after each q_proj
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if not n.startswith("embed_tokens"))  # a lookup reads one row
    assert bench.floor_nbytes(model) == weights
    model.set_kv_cache("prealloc", max_len=20)
    assert bench.cache_shapes(model) == [(2, 16), (2, 16)]  # (key/value heads, head dim)
    assert model.caches[0].name == "prealloc" and model.caches[0].get_seq_length() == 0
    floor = bench.Floor(model, batch=3, kv_len=5)
    assert floor.kv_nbytes == 2 * 2 * (3 * 2 * 5 * 16) * 4  # layers x (K, V) x floats x 4 bytes
    floor.measure(2)
    assert len(floor.times) == 2
    with torch.no_grad():
        assert bench.floor_step(floor.chain, floor.x, floor.kv).shape == (3, 300)


def test_a_run_talks_to_a_person_without_profiler_noise(tmp_path, capfd):
    bench.main(["run", "--models", "tiny", "--strategies", "none,prealloc,sliding", "--window",
                "4", "--new-tokens", "8", "--repeats", "1", "--no-cache-lengths", "8",
                "--floor-samples", "2", "--threads", "0", "--no-progress", "--out",
                str(tmp_path / "r.json")])
    out, err = capfd.readouterr()
    data = json.loads((tmp_path / "r.json").read_text())
    assert all(r["allocations"] for r in data["results"])  # the profiler did run
    for noise in bench.profiling.PROFILER_NOISE:
        assert noise not in out + err, noise
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    for column in ("strategy", "decode tok/s", "step / floor", "cache held"):
        assert column in header, column
    rows = [line.split() for line in lines[lines.index(header) + 2:] if line.startswith("tiny")]
    assert [row[5] for row in rows] == ["no", "prealloc", "sliding"]  # "no cache", as written
    assert "no cache" in out and "sliding (window 4)" in out and "0 B" in out
    assert f"report {tmp_path / 'r.json'}" in out


def test_quiet_profiler_drops_only_the_profiler_chatter(capfd):
    import os

    with bench.profiling.quiet_profiler():
        os.write(2, b"USDT:2026 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
                    b"[W] Memory block of unknown size was allocated before the profiling\n"
                    b"a real warning\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert err == "a real warning\nafter\n"
