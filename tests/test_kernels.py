"""The tests marked ``kernels`` hold on another CPU's kernels too.

This project runs on two machine types: an Intel Xeon with AMX and AVX-512 (bfloat16 in hardware)
and an AMD EPYC with AVX2 only. Their matrix kernels round differently (in bfloat16 above all, and
float32 sums in another order), so a result that is exact on one can be off by a rounding on the
other. Tests whose result depends on the kernels are marked ``@pytest.mark.kernels`` and compare
within a stated tolerance; this module runs them again in a subprocess that is limited to AVX2
kernels (PyTorch's own, oneDNN's and MKL's), which is what the AMD type runs, so a test that holds
only on the kernels of the machine it was written on fails here, on either type.

``make test-other-cpu`` runs the whole suite and every chapter on those kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The kernels of a CPU without AVX-512 or AMX: PyTorch's, oneDNN's and MKL's dispatch, capped.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def on_avx2_kernels() -> bool:
    return all(os.environ.get(k) == v for k, v in AVX2_ONLY.items())


def test_the_cap_takes_effect():
    import torch

    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ONLY},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "AVX2", out
    assert torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512", "DEFAULT"}


@pytest.mark.skipif(on_avx2_kernels(), reason="already on AVX2 kernels")
def test_kernel_dependent_tests_hold_on_avx2_kernels():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", "kernels", "tests"], cwd=ROOT, env={**os.environ, **AVX2_ONLY},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
