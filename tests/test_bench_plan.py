"""kvlib.bench.plan: the grid of cells and the checks that refuse a cell before any timing."""

import pytest
import torch

from kvlib.bench import HF_KINDS, PLANS, Bench, Suite
from kvlib.bench.plan import check_cell


def test_cli_refuses_what_it_cannot_run():
    with pytest.raises(SystemExit, match="exceed"):
        Bench([Suite(["tiny"], ["prealloc"], [300])], progress=False).run()
    with pytest.raises(SystemExit, match="unknown strategy"):
        Bench([Suite(["tiny"], ["radix"], [4])], progress=False).run()
    with pytest.raises(SystemExit, match="unknown model"):
        Bench([Suite(["gpt5"], ["prealloc"], [4])], progress=False).run()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA"):
            Bench([Suite(["tiny"], ["prealloc"], [4], devices=["cuda"])], progress=False).run()


def test_a_suite_groups_the_cells_timed_together():
    suite = Suite(["tiny", "gpt2"], ["concat", "prealloc"], [8, 16], batches=[1, 2],
                  compare_hf=True)
    groups = suite.groups()
    assert len(groups) == 2 * 2 * 2  # models x batches x new tokens
    for cells in groups:
        assert [c.strategy for c in cells] == ["concat", "prealloc", *HF_KINDS]
        assert len({(c.model, c.new_tokens, c.batch, c.dtype, c.device) for c in cells}) == 1
        assert [c.backend for c in cells] == ["kvlib", "kvlib", "hf", "hf"]


def test_the_named_plans_can_run():
    for name, suites in PLANS.items():
        for suite in suites:
            for cells in suite.groups():
                for cell in cells:
                    check_cell(cell)  # raises SystemExit otherwise
        assert suites, name
