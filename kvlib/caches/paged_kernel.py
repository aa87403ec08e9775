"""The paged decode kernel, ``paged_attention.c``: built for this machine, called with ctypes.

``PagedCache`` calls ``decode_kernel`` for a decode step (one new token per row): attention that
reads each row's blocks where they lie, instead of gathering them into one tensor first. The C
source is compiled once per process and shape (head size, query heads per key/value head) with
the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), in about 0.2 s, with
OpenMP where the compiler has it. Without a compiler, or where the build fails, a warning says
so once and the cache gathers its blocks as before: same tokens, a slower step. It runs for
float32 keys on a CPU outside autograd and ``torch.compile``; ``KVLIB_PAGED_KERNEL=0`` turns it
off (``python -m kvlib.bench flexpaged`` times it against the gather).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("paged_attention.c")
ENV = "KVLIB_PAGED_KERNEL"
# -ffast-math lets the compiler vectorise expf; it is given to the compile step only, because a
# library linked with it sets the whole process's floats to flush denormals to zero. Each try
# drops what the compiler may lack: -march=native, then OpenMP's threads.
TRIES = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-fopenmp-simd"])

Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else the first of cc, gcc, clang on the PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _build(cc: str, out: Path, head_dim: int, group: int) -> None:
    """Compile and link ``SOURCE`` into ``out`` with the first of ``TRIES`` that works."""
    shape = [f"-DHEAD_DIM={head_dim}", f"-DGROUP={group}"]
    errors = []
    for flags in TRIES:
        obj = out.with_suffix(".o")
        compile_ = [cc, "-O3", "-ffast-math", "-fPIC", *flags, *shape, "-c", str(SOURCE),
                    "-o", str(obj)]
        link = [cc, "-shared", *[f for f in flags if f == "-fopenmp"], str(obj), "-o", str(out),
                "-lm"]
        for cmd in (compile_, link):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                errors.append(f"{' '.join(cmd)}\n{done.stderr.strip()[-400:]}")
                break
        else:
            return
    raise RuntimeError("\n".join(errors))


@functools.cache
def _library(head_dim: int, group: int) -> Callable | None:
    """The kernel's C function for one shape, built now; None (with a warning) if it cannot be."""
    cc = compiler()
    why = "no C compiler found (install gcc or clang, or set CC)"
    if cc is not None:
        with tempfile.TemporaryDirectory(prefix="kvlib-", ignore_cleanup_errors=True) as tmp:
            path = Path(tmp) / f"paged_attention_{head_dim}_{group}.so"
            try:
                _build(cc, path, head_dim, group)
                lib = ctypes.CDLL(str(path))  # mapped now: the file may go
            except (OSError, RuntimeError) as e:
                lib, why = None, (f"building {SOURCE.name} with {cc} failed (set CC to a "
                                  f"working C compiler):\n{e}")
        if lib is not None:
            fn = lib.paged_decode_attention
            P, I64 = ctypes.c_void_p, ctypes.c_int64
            fn.argtypes = [P] * 6 + [I64] * 4 + [ctypes.c_float, ctypes.c_int]
            fn.restype = ctypes.c_int
            return fn
    _warn_once(f"kvlib's paged decode kernel is off: {why}. PagedCache gathers its blocks "
               f"instead (the same tokens, a slower step); {ENV}=0 silences this.")
    return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def decode_kernel(q: Tensor, keys: Tensor) -> Kernel | None:
    """The kernel for a decode step with queries ``q`` ``(B, H, 1, D)`` and new keys ``keys``
    ``(B, H_kv, 1, D)``, or None where it does not run (then the cache gathers): it needs
    float32 on a CPU, outside autograd and ``torch.compile``, and a C compiler."""
    B, H, T, D = q.shape
    H_kv = keys.shape[1]
    if (T != 1 or not enabled() or q.device.type != "cpu" or q.dtype != torch.float32
            or keys.dtype != torch.float32 or H % H_kv
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad))):
        return None
    fn = _library(D, H // H_kv)
    if fn is None:
        return None
    return functools.partial(_call, fn)


def kernel_runs(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """Whether a float32 decode step of this shape runs the kernel here (it builds it)."""
    return decode_kernel(torch.zeros(1, n_heads, 1, head_dim),
                         torch.zeros(1, n_kv_heads, 1, head_dim)) is not None


def _call(fn: Callable, q: Tensor, K: Tensor, V: Tensor, tables: Tensor, lengths: Tensor
          ) -> Tensor:
    """Attention of ``q`` ``(B, H, 1, D)`` over row b's first ``lengths[b]`` slots of its blocks
    ``tables[b]`` in one layer's storage ``K``, ``V`` ``(N, bs, H_kv, D)``: ``(B, H, 1, D)``."""
    B, H, _, D = q.shape
    _, bs, H_kv, _ = K.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    if fn(q.data_ptr(), K.data_ptr(), V.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
          out.data_ptr(), B, H_kv, bs, tables.shape[1], 1 / math.sqrt(D),
          torch.get_num_threads()) != 0:
        raise MemoryError("the paged decode kernel could not allocate its scores buffer")
    return out
