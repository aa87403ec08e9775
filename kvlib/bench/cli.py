"""``python -m kvlib.bench`` (and the ``kvlib-bench`` script): run, report, plot, lockstep,
compile. See the package docstring for what a run measures."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..loading import load_model
from .compress import compress, compress_lines
from .figures import plot
from .flexpaged import flex_paged, flex_paged_lines
from .latent import latent, latent_lines
from .lockstep import lockstep, lockstep_text
from .overhead import compile_check, floor_gap
from .plan import PLANS, Suite
from .report import compile_text, gap_text, report, summary_table
from .run import Bench
from .serving import serving, serving_lines
from .speculative import speculative, speculative_lines
from .streaming import streaming, streaming_lines
from .surgery import chunked_prefill, sharing, surgery_lines

DESCRIPTION = ("Benchmarks: every cache strategy, measured against the weight-streaming floor and "
               "Hugging Face.")


def _csv(kind: Callable = str) -> Callable[[str], list]:
    return lambda s: [kind(x) for x in s.replace(",", " ").split()]


def add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="run benchmarks, write JSON (and plots)")
    r.add_argument("--plan", choices=sorted(PLANS), help="a named set of suites (overrides the "
                   "grid options below)")
    r.add_argument("--models", type=_csv(), default=["gpt2"], help="e.g. tiny,gpt2,gpt2-medium")
    r.add_argument("--strategies", type=_csv(), default=["none", "concat", "prealloc",
                                                         "sliding"])
    r.add_argument("--new-tokens", type=_csv(int), default=[200])
    r.add_argument("--batch", type=_csv(int), default=[1])
    r.add_argument("--dtype", type=_csv(), default=["float32"], help="float32,bfloat16,float16")
    r.add_argument("--device", type=_csv(), default=["cpu"], help="cpu,cuda,mps")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--window", type=int, default=128, help="sliding window (tokens)")
    r.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave)")
    r.add_argument("--compare", choices=["hf"], help="also run transformers' DynamicCache and "
                   "StaticCache with the same weights")
    r.add_argument("--no-cache-lengths", type=_csv(int), default=[64, 256, 512, 1000])
    r.add_argument("--overhead", action="store_true", help="measure per-step overhead")
    r.add_argument("--overhead-tokens", type=int, default=100)
    r.add_argument("--floor-samples", type=int, default=20, help="floor steps timed per group")
    r.add_argument("--out", default="results.json")
    r.add_argument("--plots", help="directory for the PNG plots")
    r.add_argument("--note", default="", help="a line stored in the JSON and shown in the report")
    r.add_argument("--title", default="", help="the report's title (default: Benchmark results)")
    r.add_argument("--no-progress", action="store_true")


def add_report_parser(sub) -> None:
    """``report``: the Markdown of a results JSON and of the other commands' JSON files."""
    rep = sub.add_parser("report", help="Markdown tables of a results JSON (to stdout)")
    rep.add_argument("json")
    rep.add_argument("--plots-dir", default="", help="where the PNGs are (to list only those)")
    rep.add_argument("--compile", help="a JSON written by the compile command, to include")
    for name in ("lockstep", "gap", "streaming", "serving", "flexpaged"):  # a machine type each
        rep.add_argument(f"--{name}", action="append", default=[], help=f"a JSON written by "
                         f"the {name} command, to include; repeatable")
    rep.add_argument("--compress", help="a JSON written by the compress command, to include")
    for name in ("speculative", "surgery", "latent"):
        rep.add_argument(f"--{name}", help=f"a JSON written by the {name} command, to include")
    rep.add_argument("--also", action="append", default=[], help="another run's JSON (e.g. "
                     "another plan or machine), appended as its own report; repeatable")


def add_other_parsers(sub) -> None:
    add_report_parser(sub)
    ls = sub.add_parser("lockstep", help="kvlib, DynamicCache and the floor one step each, in "
                        "turn (needs transformers)")
    ls.add_argument("--model", default="gpt2")
    ls.add_argument("--strategy", default="prealloc", choices=["concat", "prealloc"])
    ls.add_argument("--new-tokens", type=_csv(int), default=[200, 1000])
    ls.add_argument("--repeats", type=int, default=3)
    ls.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave)")
    ls.add_argument("--compile", action="store_true", help="kvlib's compiled decoding "
                    "(generate(..., compile=True)) takes a turn too; the warm-up compiles it")
    ls.add_argument("--aot", action="store_true", help="kvlib.aot's ahead-of-time compiled "
                    "step takes a turn too (the Llama family or GPT-2; compiled first)")
    ls.add_argument("--out", default="lockstep.json")
    ls.add_argument("--no-progress", action="store_true")
    co = sub.add_parser("compile", help="eager vs torch.compile decode step (minutes)")
    co.add_argument("--model", type=_csv(str), default=["gpt2"], help="one or more, e.g. "
                    "mini-llama,gpt2")
    co.add_argument("--new-tokens", type=int, default=100)
    co.add_argument("--threads", type=int, default=2)
    co.add_argument("--out", default="compile.json")
    ga = sub.add_parser("gap", help="where a decode step's time above the floor goes: kvlib's "
                        "step, the bare functional one, without each kind of small op")
    ga.add_argument("--model", default="mini-llama")
    ga.add_argument("--kv-len", type=int, default=100, help="cached tokens")
    ga.add_argument("--rounds", type=int, default=100)
    ga.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave)")
    ga.add_argument("--out", default="gap.json")
    st = sub.add_parser("streaming", help="attention sinks vs prealloc vs recomputing the "
                        "window, far past the context")
    st.add_argument("--model", default="mini-llama")
    st.add_argument("--length", type=int, default=2048, help="tokens streamed (8x the context)")
    st.add_argument("--window", type=int, help="default: the context less the sinks")
    st.add_argument("--n-sink", type=int, default=4)
    st.add_argument("--repeats", type=int, default=3)
    st.add_argument("--warmup", type=int, default=1)
    st.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave)")
    st.add_argument("--compile", action="store_true", help="every strategy decodes compiled "
                    "(generate(..., compile=True)); the warm-up pass compiles")
    st.add_argument("--out", default="streaming.json")
    st.add_argument("--no-progress", action="store_true")
    pl = sub.add_parser("plot", help="PNG plots of a results JSON")
    pl.add_argument("json")
    pl.add_argument("--dir", default=".")


def add_surgery_parsers(sub) -> None:
    sp = sub.add_parser("speculative", help="speculative decoding (prompt lookup, a draft "
                        "model) against plain decoding and transformers' assisted generation")
    sp.add_argument("--model", default="mini-llama", help="a trained model")
    sp.add_argument("--draft", default="mini-llama-draft", help="a trained draft ('' for none)")
    sp.add_argument("--prompts", type=int, default=8)
    sp.add_argument("--prompt-len", type=int, default=128)
    sp.add_argument("--new-tokens", type=int, default=128)
    sp.add_argument("--draft-tokens", type=int, default=4)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--warmup", type=int, default=1)
    sp.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    sp.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave)")
    sp.add_argument("--out", default="speculative.json")
    sp.add_argument("--no-progress", action="store_true")
    la = sub.add_parser("latent", help="latent attention's decode step, naive against absorbed")
    la.add_argument("--contexts", type=_csv(int), default=[64, 256, 1024, 2048])
    la.add_argument("--repeats", type=int, default=5)
    la.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave)")
    la.add_argument("--out", default="latent.json")
    fp = sub.add_parser("flexpaged", help="paged decode attention: PagedCache's gather against "
                        "FlexAttention reading blocks through a block table (compiled)")
    fp.add_argument("--model", default="mini-llama", help="whose attention shape")
    fp.add_argument("--batch", type=int, default=8)
    fp.add_argument("--length", type=int, default=240, help="cached tokens per row")
    fp.add_argument("--block-size", type=int, default=16)
    fp.add_argument("--rounds", type=int, default=200)
    fp.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave)")
    fp.add_argument("--out", default="flexpaged.json")


def add_serving_parsers(sub) -> None:
    """The commands of the later chapters: many requests, compressed caches."""
    sv = sub.add_parser("serving", help="many requests: one at a time, static padded batches "
                        "(kvlib and transformers) and the continuous-batching engine")
    sv.add_argument("--models", type=_csv(), default=["mini-llama", "gpt2"],
                    help="random-weight shapes: gpt2 or a Llama preset")
    sv.add_argument("--requests", type=int, default=32)
    sv.add_argument("--system", type=int, default=200, help="shared system prompt, tokens")
    sv.add_argument("--prompt", type=_csv(int), default=[8, 64], help="own prompt: lo,hi")
    sv.add_argument("--output", type=_csv(int), default=[8, 64], help="output tokens: lo,hi")
    sv.add_argument("--batch", type=int, default=8)
    sv.add_argument("--block-size", type=int, default=16)
    sv.add_argument("--repeats", type=int, default=3)
    sv.add_argument("--warmup", type=int, default=1)
    sv.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    sv.add_argument("--step-length", type=int, default=256)
    sv.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave)")
    sv.add_argument("--out", default="serving.json")
    sv.add_argument("--no-progress", action="store_true")
    su = sub.add_parser("surgery", help="the engine: inter-token latency with and without "
                        "chunked prefill, and the blocks forks and beams share")
    su.add_argument("--model", default="mini-llama", help="random-weight shape")
    su.add_argument("--budgets", type=_csv(), default=["none", "512", "128", "32"],
                    help="max_batched_tokens values (none: no budget)")
    su.add_argument("--decoders", type=int, default=8)
    su.add_argument("--decode-tokens", type=int, default=64)
    su.add_argument("--long-prompts", type=int, default=4)
    su.add_argument("--long-len", type=int, default=384)
    su.add_argument("--arrive-every", type=int, default=8)
    su.add_argument("--block-size", type=int, default=16)
    su.add_argument("--repeats", type=int, default=3)
    su.add_argument("--warmup", type=int, default=1)
    su.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave)")
    su.add_argument("--out", default="surgery.json")
    su.add_argument("--no-progress", action="store_true")
    cp = sub.add_parser("compress", help="quantized and evicting caches: perplexity, greedy "
                        "agreement, bytes held and decode step (a minute or two)")
    cp.add_argument("--model", default="mini-llama")
    cp.add_argument("--windows", type=int, default=16, help="held-out windows of the context")
    cp.add_argument("--repeats", type=int, default=3)
    cp.add_argument("--no-gpt2", action="store_true", help="skip GPT-2 124M (random weights)")
    cp.add_argument("--no-hf", action="store_true", help="skip transformers' QuantizedCache")
    cp.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave)")
    cp.add_argument("--out", default="compress.json")
    cp.add_argument("--no-progress", action="store_true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kvlib.bench", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_run_parser(sub)
    add_other_parsers(sub)
    add_serving_parsers(sub)
    add_surgery_parsers(sub)
    return ap.parse_args(argv)


def _read(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _write(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def _command(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "kvlib.bench", *argv])


def cmd_report(args: argparse.Namespace, argv: list[str]) -> None:
    command = _command(argv) + " > benchmarks/RESULTS.md"  # named in every part it prints
    data = {**_read(args.json), "report_command": command}
    if args.compile:
        data["compile"] = _read(args.compile)
    if args.lockstep:
        data["lockstep"] = [_read(path) for path in args.lockstep]
    print(report(data, args.plots_dir))
    sections = [  # (the JSON files given, the Markdown lines of one), in the report's order
        (args.streaming, streaming_lines), (args.serving, lambda d: serving_lines(d["runs"])),
        ([args.compress], compress_lines),
        (args.gap, lambda g: gap_text(g, g["model"]) + [f"Command: `{g['command']}`", ""]),
        ([args.speculative], speculative_lines), ([args.surgery], surgery_lines),
        ([args.latent], latent_lines), (args.flexpaged, flex_paged_lines)]
    for paths, lines in sections:
        for path in filter(None, paths):
            print("\n---\n")
            print("\n".join(lines(_read(path))))
    for path in args.also:  # each with its own machine, commands and targets
        print("\n---\n")
        print(report({**_read(path), "report_command": command}))


def cmd_compile(args: argparse.Namespace, argv: list[str]) -> None:
    c = {"runs": [compile_check(m, args.new_tokens) for m in args.model],
         "command": _command(argv)}
    _write(args.out, c)
    print(compile_text(c))


def cmd_gap(args: argparse.Namespace, argv: list[str]) -> None:
    model = load_model(args.model, seed=123, dtype=torch.float32, device="cpu")
    g = {"model": args.model, **floor_gap(model, args.kv_len, args.rounds),
         "command": _command(argv)}
    _write(args.out, g)
    print("\n".join(gap_text(g, args.model)))


def cmd_lockstep(args: argparse.Namespace, argv: list[str]) -> None:
    d = lockstep(args.model, tuple(args.new_tokens), args.repeats, args.strategy,
                 progress=not args.no_progress, compile=args.compile, aot=args.aot)
    d["command"] = _command(argv)
    _write(args.out, d)
    print("\n".join(lockstep_text(d)))


def cmd_streaming(args: argparse.Namespace, argv: list[str]) -> None:
    d = streaming(args.model, args.length, args.window, args.n_sink, args.repeats, args.warmup,
                  progress=not args.no_progress, compile=args.compile)
    d["command"] = _command(argv)
    _write(args.out, d)
    print("\n".join(streaming_lines(d)))


def cmd_serving(args: argparse.Namespace, argv: list[str]) -> None:
    runs = []
    for name in args.models:
        d = serving(name, args.requests, args.system, tuple(args.prompt), tuple(args.output),
                    args.batch, args.block_size, args.repeats, args.warmup, not args.no_hf,
                    args.step_length, progress=not args.no_progress)
        d["command"] = _command(argv)
        runs.append(d)
    _write(args.out, {"kind": "serving", "runs": runs})
    print("\n".join(serving_lines(runs)))


def cmd_surgery(args: argparse.Namespace, argv: list[str]) -> None:
    budgets = tuple(None if b == "none" else int(b) for b in args.budgets)
    chunked = chunked_prefill(args.model, budgets, args.decoders, args.decode_tokens,
                              args.long_prompts, args.long_len, args.arrive_every,
                              args.block_size, args.repeats, args.warmup,
                              progress=not args.no_progress)
    d = {"kind": "surgery", "chunked": chunked,
         "sharing": sharing(args.model, block_size=args.block_size), "command": _command(argv)}
    _write(args.out, d)
    print("\n".join(surgery_lines(d)))


def cmd_speculative(args: argparse.Namespace, argv: list[str]) -> None:
    d = speculative(args.model, args.draft or None, args.prompts, args.prompt_len,
                    args.new_tokens, args.draft_tokens, args.repeats, args.warmup,
                    not args.no_hf, progress=not args.no_progress)
    d["command"] = _command(argv)
    _write(args.out, d)
    print("\n".join(speculative_lines(d)))


def cmd_latent(args: argparse.Namespace, argv: list[str]) -> None:
    d = latent(tuple(args.contexts), repeats=args.repeats)
    d["command"] = _command(argv)
    _write(args.out, d)
    print("\n".join(latent_lines(d)))


def cmd_flexpaged(args: argparse.Namespace, argv: list[str]) -> None:
    d = flex_paged(args.model, args.batch, args.length, args.block_size, args.rounds)
    d["command"] = _command(argv)
    _write(args.out, d)
    print("\n".join(flex_paged_lines(d)))


def cmd_compress(args: argparse.Namespace, argv: list[str]) -> None:
    d = compress(args.model, args.windows, repeats=args.repeats, gpt2=not args.no_gpt2,
                 hf=not args.no_hf, progress=not args.no_progress)
    d["command"] = _command(argv)
    _write(args.out, d)
    print("\n".join(compress_lines(d)))


def cmd_plot(args: argparse.Namespace, argv: list[str]) -> None:
    for p in plot(_read(args.json), args.dir):
        print(p)


def cmd_run(args: argparse.Namespace, argv: list[str]) -> None:
    if args.plan:
        suites = PLANS[args.plan]
    else:
        suites = [Suite(args.models, args.strategies, args.new_tokens, args.batch, args.dtype,
                        args.device, args.repeats, args.compare == "hf")]
    bench = Bench(suites, warmup=args.warmup, window=args.window,
                  no_cache_lengths=tuple(args.no_cache_lengths), overhead=args.overhead,
                  overhead_tokens=args.overhead_tokens, floor_samples=args.floor_samples,
                  progress=not args.no_progress, command=_command(argv))
    data = bench.run()
    data["note"] = args.note
    data["title"] = args.title
    _write(args.out, data)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.plots:
        for p in plot(data, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    print(f"\nDecode speed (medians over the repeats; step / floor: the median decode step over "
          f"the weight-streaming floor)\n\n{summary_table(data)}\n\nEvery table: python -m "
          f"kvlib.bench report {shlex.quote(args.out)}")


COMMANDS = {"run": cmd_run, "report": cmd_report, "plot": cmd_plot, "lockstep": cmd_lockstep,
            "compile": cmd_compile, "gap": cmd_gap, "streaming": cmd_streaming,
            "serving": cmd_serving, "compress": cmd_compress, "surgery": cmd_surgery,
            "speculative": cmd_speculative, "latent": cmd_latent, "flexpaged": cmd_flexpaged}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    COMMANDS[args.cmd](args, argv)
