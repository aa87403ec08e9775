import json
import math
import os
from pathlib import Path

import pytest
import torch

import kvlib

# Offline machines: use the tiktoken files beside the checkout when they are there.
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken-cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _shared.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_shared)

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_report_header(config):
    return (f"torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")


def _make_model(preset: str = "tiny", seed: int = 0, **overrides) -> kvlib.GPTModel:
    torch.manual_seed(seed)
    return kvlib.GPTModel(kvlib.GPTConfig.from_preset(preset, **overrides)).eval()


def _make_llama(preset: str = "tiny-llama", seed: int = 0, **overrides) -> kvlib.LlamaModel:
    torch.manual_seed(seed)
    return kvlib.LlamaModel(kvlib.LlamaConfig.from_preset(preset, **overrides)).eval()


@pytest.fixture(scope="session")
def make_llama():
    """A factory: ``make_llama(preset="tiny-llama", seed=0, **config_overrides)``, a fresh
    Llama-family model in eval mode."""
    return _make_llama


@pytest.fixture(scope="session")
def make_model():
    """A factory: ``make_model(preset="tiny", seed=0, **config_overrides)``, a fresh GPT-2-family
    model in eval mode, for tests that change the model they get."""
    return _make_model


def _teacher_forced(model, seq, strategy, window=None, prompt_len=1):
    """Logits for every position of ``seq`` (B, T) fed through a cache: the first ``prompt_len``
    tokens as one prefill, then one token a step. A sliding cache without a window gets the whole
    context (so it must equal full attention)."""
    window = window or (model.cfg.context_length if strategy == "sliding" else None)
    model.set_kv_cache(strategy, window=window)
    with torch.no_grad():
        out = [model(seq[:, :prompt_len], use_cache=True)]
        for t in range(prompt_len, seq.shape[1]):
            out.append(model(seq[:, t : t + 1], use_cache=True))
    return torch.cat(out, dim=1)


@pytest.fixture(scope="session")
def teacher_forced():
    """``teacher_forced(model, seq, strategy, window=None, prompt_len=1)``: every position's
    logits through a cache, a prefill and then one token a step."""
    return _teacher_forced


@pytest.fixture(scope="session")
def tiny() -> kvlib.GPTModel:
    return _make_model("tiny")


@pytest.fixture(scope="session")
def gpt2() -> kvlib.GPTModel:
    return _make_model("gpt2", seed=123)


@pytest.fixture(scope="module")
def one_thread():
    """Models this small run fastest on one thread; two threads on a busy 2-core machine can be
    100x slower (OpenMP workers waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prompt() -> str:
    """The prompt the pictures' tests generate from (5 tokens)."""
    return "The cache keeps the keys"


@pytest.fixture
def reader_model() -> kvlib.GPTModel:
    """A fresh tiny model as a reader leaves it between two cells: sliding caches that hold the
    reader's tokens (the ring has wrapped), the position counter past them, in training mode."""
    model = _make_model("tiny")
    kvlib.generate(model, torch.tensor([kvlib.encode("The reader's own text")]), 6,
                   cache="sliding", window=4)
    model.train()
    return model


def _same_bytes(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="session")
def left_as_found():
    """``check = left_as_found(model)`` before lending the model out, ``check()`` after: every
    layer holds the same cache object (``is``) with the same tokens and bytes, and the position
    counter, training flags, dtype and device are what they were."""

    def note(model: kvlib.CausalLM):
        caches = list(model.caches)
        lengths = [c.get_seq_length() for c in caches]
        buffers = [{n: b.clone() for n, b in c.named_buffers()} for c in caches]
        pos, training = model.pos, [m.training for m in model.modules()]
        first = next(model.parameters())
        dtype, device = first.dtype, first.device

        def check() -> None:
            assert all(now is then for now, then in zip(model.caches, caches, strict=True))
            assert [c.get_seq_length() for c in model.caches] == lengths
            for cache, held in zip(model.caches, buffers, strict=True):
                now = dict(cache.named_buffers())
                assert now.keys() == held.keys()
                assert all(_same_bytes(now[n], held[n]) for n in held)
            assert model.pos == pos
            assert [m.training for m in model.modules()] == training
            first = next(model.parameters())
            assert (first.dtype, first.device) == (dtype, device)

        return check

    return note


# ---------------------------------------------------------------- kvlib.bench (test_bench_*.py)

BENCH_RUN = {"new_tokens": 12, "window": 8, "lengths": (16, 32),
             "strategies": ["none", "concat", "prealloc", "sliding"]}


@pytest.fixture(scope="session")
def bench_run(tmp_path_factory):
    """One small run of the bench CLI (tiny model, 12 tokens, every strategy, with transformers,
    the no-cache lengths, the overhead section and the plots), shared by the bench tests:
    ``(folder, settings, results JSON)``."""
    pytest.importorskip("transformers")
    from kvlib import bench

    out, s = tmp_path_factory.mktemp("bench"), BENCH_RUN
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    try:
        bench.main(["run", "--models", "tiny", "--strategies", ",".join(s["strategies"]),
                    "--new-tokens", str(s["new_tokens"]), "--repeats", "2", "--window",
                    str(s["window"]), "--compare", "hf", "--no-cache-lengths",
                    ",".join(map(str, s["lengths"])), "--overhead", "--overhead-tokens", "6",
                    "--floor-samples", "4", "--threads", "0", "--no-progress",
                    "--out", str(out / "results.json"), "--plots", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, s, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="session")
def synthetic_results():
    """``synthetic_results(step_over_floor, tokens_per_s)``: result rows for gpt2, float32,
    batch 1 with the given decode tokens/s and floor ratios by (strategy, new tokens)."""
    def make(step: dict, tps: dict, **extra) -> dict:
        rows = []
        for (strategy, n), t in tps.items():
            rows.append({
                "model": "gpt2", "dtype": "float32", "batch": 1, "device": "cpu",
                "new_tokens": n, "strategy": strategy,
                "backend": "hf" if strategy.startswith("hf") else "kvlib",
                "decode_tokens_per_s": {"median": t}, "step_ms": {"p50": 1000 / t},
                "floor_ratio": step.get((strategy, n), math.nan), "first_ms": 10.0,
                "last_ms": 11.0 if strategy == "prealloc" else 20.0, "end_floor_kv_ratio": 1.1,
                "wall_s": {"median": 1.0}})
        return {"results": rows, "environment": {"threads": 2}, "floor": [], **extra}

    return make


@pytest.fixture(scope="session")
def run_like_data(synthetic_results):
    """``run_like_data()``: a results JSON with no results but every field a report reads."""
    from kvlib.bench import targets

    def make() -> dict:
        data = synthetic_results({}, {})
        return {**data, "targets": targets(data), "created": "now", "duration_s": 60.0,
                "command": "python -m kvlib.bench run",
                "environment": {**data["environment"], "cpu_model": "cpu", "cpu_count": 2,
                                "torch": "2", "python": "3", "transformers": "5",
                                "platform": "x", "gpu": None},
                "no_cache": [], "overhead": None}

    return make
