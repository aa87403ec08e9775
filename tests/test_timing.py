"""kvlib.timing: the stopwatch every timing site uses, and tokens per second."""

import math
import time

import pytest

from kvlib.timing import Stopwatch, device_sync, tokens_per_s


def test_stopwatch_measures_the_block():
    with Stopwatch("cpu") as sw:
        time.sleep(0.02)
    assert 0.015 < sw.seconds < 1.0


def test_stopwatch_is_nan_until_the_block_ends():
    sw = Stopwatch()
    assert math.isnan(sw.seconds)


def test_tokens_per_s():
    assert tokens_per_s([0.5, 0.5]) == pytest.approx(2.0)
    assert math.isnan(tokens_per_s([]))


def test_device_sync_on_cpu_is_a_no_op():
    device_sync("cpu")  # must not raise without a GPU
