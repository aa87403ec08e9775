"""kvlib.plots.serving: a padded batch's slots, the engine's pool, memory over a run."""

import torch

import kvlib
from kvlib.plots import (
    engine_step_pngs,
    padded_batch_slots,
    plot_engine_step,
    plot_padded_batch,
    plot_serving_memory,
    serving_memory,
)


def test_padded_batch_slots_add_up():
    c = padded_batch_slots([5, 2, 3], [4, 1, 2])
    assert c == {"padding": 0 + 3 + 2, "prompt": 10, "output": 7, "idle": 0 + 3 + 2,
                 "total": 3 * (5 + 4)}
    assert c["padding"] + c["prompt"] + c["output"] + c["idle"] == c["total"]
    fig = plot_padded_batch([5, 2, 3], [4, 1, 2])
    assert "17 of 27 slots" in fig.axes[0].get_title()


def _engine(tiny):
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=12)
    system = list(range(20, 28))  # two full blocks, shared by the second request
    engine.add_request(torch.tensor(system + [1, 2, 3]), 5)
    engine.add_request(torch.tensor(system + [4]), 7, arrival_step=1)
    engine.run()
    return engine


def test_engine_frames_show_the_pool(tiny):
    engine = _engine(tiny)
    fig = plot_engine_step(engine, 1, columns=6)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "x2" in texts  # the two shared system blocks
    assert "step 1: 2 running" in fig.axes[0].get_title()
    pngs = engine_step_pngs(engine, steps=[0, 1])
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs) and pngs[0] != pngs[1]


def test_serving_memory_is_consistent(tiny):
    engine = _engine(tiny)
    m = serving_memory(engine)
    assert len(m["used"]) == len(engine.history)
    assert (m["paged"] >= m["used"]).all() and (m["prealloc"] >= m["used"]).all()
    assert m["used"][-1] == 0 and m["paged"][-1] == 0  # everything given back at the end
    assert plot_serving_memory(engine).axes[0].get_xlabel() == "engine step"
