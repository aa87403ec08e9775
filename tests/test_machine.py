"""kvlib.machine: one description of what a measurement ran on."""

import torch

import kvlib
from kvlib.machine import environment_info


def test_environment_line_names_device_dtype_threads(tiny):
    line = kvlib.environment(tiny)
    assert line.startswith("device=cpu (")
    assert "dtype=float32" in line and f"threads={torch.get_num_threads()}" in line
    assert f"torch={torch.__version__}" in line


def test_environment_info_has_what_a_reader_compares():
    info = environment_info("cpu")
    for key in ("torch", "python", "kvlib", "cpu_model", "cpu_count", "threads", "device"):
        assert info[key] not in (None, ""), key
    assert info["kvlib"] == kvlib.__version__


def test_cpu_bf16_capability_is_reported():
    from kvlib.machine import cpu_has_fast_bf16

    info = environment_info("cpu")
    assert info["cpu_fast_bf16"] is cpu_has_fast_bf16() and info["cpu_fast_bf16"] in (True,
                                                                                        False, None)
    assert isinstance(info["cpu_capability"], str)
