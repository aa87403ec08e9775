"""Is a change slower? This checkout's decode step against a git revision's, in lockstep.

    python scripts/step_vs_revision.py REV [--model gpt2] [--steps 200] [--repeats 3]

The revision's ``kvlib/`` is unpacked into a temporary folder as the package ``kvlib_rev`` (kvlib
imports itself relatively, so it runs under another name), both build the same model with the same
weights and a preallocated cache, and then they take turns: one decode step of one, one of the
other, the order of the steps and of building the models swapped every repeat, so that a shared
machine's drift (and where each model's memory lands) hits both alike. Prints the
median step of each, their ratio and whether both chose the same greedy tokens. Run it on a quiet
machine: nothing else timing or training.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvlib  # noqa: E402  (this checkout's)
from kvlib.timing import Stopwatch  # noqa: E402

PROMPT = [464, 1994, 284, 3049, 5270, 318]  # "The key to fast generation is"


def revision_kvlib(rev: str, folder: Path):
    """The package ``kvlib/`` of ``rev``, importable as ``kvlib_rev``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kvlib"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "kvlib").rename(folder / "kvlib_rev")
    sys.path.insert(0, str(folder))
    return importlib.import_module("kvlib_rev")


def stepper(lib, model, n: int):
    """Prefill, then yield (token, seconds) for each of ``n`` greedy decode steps."""
    idx = torch.tensor([PROMPT])
    with torch.inference_mode():
        model.set_kv_cache("prealloc", max_len=len(PROMPT) + n + 1)
        logits = lib.prefill(model, idx)
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(n):
            with Stopwatch("cpu") as sw:
                logits = model(tok, use_cache=True, last_only=True, check_ids=False)[:, -1]
                tok = logits.argmax(-1, keepdim=True)
            yield int(tok), sw.seconds


def models(rev, name: str, new_first: bool):
    """The same model built by both, in the order asked: which one is made first (and where
    its memory lands) moves a step by about 0.5% on a CPU, so the order swaps every repeat."""
    made = {}
    for who in (("new", "old") if new_first else ("old", "new")):
        made[who] = (kvlib if who == "new" else rev).load_model(name, seed=123)
    made["old"].load_state_dict(made["new"].state_dict())
    return made["new"], made["old"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rev = revision_kvlib(args.rev, Path(tmp))
        times = {"this checkout": [], args.rev: []}
        same = True
        for r in range(-1, args.repeats):  # r = -1: an untimed warm-up
            n = 32 if r < 0 else args.steps
            new, old = models(rev, args.model, new_first=r % 2 == 0)
            streams = {"this checkout": stepper(kvlib, new, n), args.rev: stepper(rev, old, n)}
            order = list(streams) if r % 2 == 0 else list(streams)[::-1]
            for _ in range(n):
                got = {who: next(streams[who]) for who in order}
                same &= got["this checkout"][0] == got[args.rev][0]
                if r >= 0:
                    for who, (_, s) in got.items():
                        times[who].append(s)
    print(kvlib.environment(new))
    med = {who: float(np.median(t)) * 1e3 for who, t in times.items()}
    for who, ms in med.items():
        print(f"{who:>14s}: median decode step {ms:.3f} ms over {len(times[who])} steps")
    print(f"this checkout / {args.rev}: {med['this checkout'] / med[args.rev]:.3f}; "
          f"same greedy tokens: {same}")


if __name__ == "__main__":
    main()
