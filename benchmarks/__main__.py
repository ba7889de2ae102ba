"""``python -m benchmarks``: run the benchmark suite, print a markdown table per op, write rows and plots.

    python -m benchmarks --cpu                     # CPU figures (make bench)
    python -m benchmarks --preset gpu              # the kernel issues' GPU figures
    python -m benchmarks --ops masked_ce --preset smoke --out /tmp/rows.jsonl

Rows are appended to ``--out`` (JSONL, one row per metric; see benchmarks/harness.py);
the tables and plots use the rows of this run only.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import sys
import time
from pathlib import Path

import torch

from . import tables
from .harness import REPO, RESULTS, Settings, environment, latest_run, read_rows, run_bench

OPS = {"attention": "bench_attention", "masked_ce": "bench_masked_ce", "block_sparse": "bench_block_sparse",
       "train_step": "bench_train_step", "hf_patch": "bench_hf_patch", "overhead": "bench_overhead"}
PRESETS = ("smoke", "cpu", "gpu-check", "gpu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--preset", choices=PRESETS, help="shape set (default: cpu on the CPU, gpu on a GPU)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--out", type=Path, help="results file to append to (default benchmarks/results/<device>-rows.jsonl)")
    p.add_argument("--summary", type=Path, help="markdown summary to write (default beside --out)")
    p.add_argument("--plots", type=Path, help="folder for PNG plots (default beside --out; 'none' to skip)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this long")
    p.add_argument("--cpu-time-s", type=float, default=2.0, help="timing budget per provider on the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: redraw the summary and plots from the newest run in --out")
    return p.parse_args(argv)


def device_tag(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    short = next((w for w in name.replace("-", " ").split() if any(c.isdigit() for c in w)), name.split()[-1])
    return time.strftime("%Y-%m-%d", time.gmtime()) + "-" + short


def _shown(path) -> str:
    """A path as the reader should see it: relative to the repo when it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def bench_reports(rows: list[dict]) -> str:
    """The ``report(rows)`` of each bench module that has one (overhead: µs per call), for its ops' rows."""
    parts = []
    for op in dict.fromkeys(r["op"] for r in rows):
        bench = importlib.import_module(f"benchmarks.{OPS[op]}") if op in OPS else None
        if hasattr(bench, "report"):
            parts.append(f"## {op}: report\n\n" + bench.report(rows))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    preset = args.preset or ("cpu" if device == "cpu" else "gpu")
    unknown = [op for op in args.ops.split(",") if op not in OPS]
    if unknown:
        sys.exit(f"unknown ops {unknown}; choose from {list(OPS)}")
    tag = device_tag(device)
    out = args.out or RESULTS / f"{tag}-rows.jsonl"
    stem = out.name[: -len("rows.jsonl")] if out.name.endswith("rows.jsonl") else out.stem + "-"
    summary = args.summary or out.with_name(f"{stem}summary.md")
    settings = Settings(cpu_budget_s=args.cpu_time_s, memory=not args.no_memory)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s

    rows = []
    if args.report_only:
        rows = latest_run(read_rows(out))
        settings.run_id = rows[0]["run"] if rows else settings.run_id
    for op in [] if args.report_only else args.ops.split(","):
        bench = importlib.import_module(f"benchmarks.{OPS[op]}")
        # A bench may declare MEASURE_MEMORY = False (per-call overhead: there is no memory to speak of).
        op_settings = dataclasses.replace(settings, memory=settings.memory and getattr(bench, "MEASURE_MEMORY", True))
        rows += run_bench(bench, preset, device, op_settings, out, deadline, echo=lambda line: print(line, flush=True))

    env = rows[0] if args.report_only and rows else environment(device)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    loads = sorted({r.get("load", "n/a") for r in rows}) if rows else ["n/a"]
    lines = [f"# Benchmarks: {tag}, preset {preset}", "",
             f"Command: `{command}`  ", f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}; rows measured at commit(s) {', '.join(sorted({r['commit'] for r in rows}) or [env['commit']])} "
             f"(plus any uncommitted work in the tree); {env['date']}  ",
             f"Torch CPU threads: {env.get('threads', 'not recorded')}; host load average (1/5/15 min) when each "
             f"op started: {', '.join(loads)}  ",
             f"Rows: `{_shown(out)}` (run {settings.run_id})", "",
             "Speed-ups are other time / this time (> 1: this provider is faster); memory ratios are other "
             "peak / this peak (> 1: this provider uses less). CPU peak memory is the peak resident set "
             "during one call above the resident set before it, in a fresh process; GPU peak memory is "
             "torch.cuda.max_memory_allocated above the memory allocated before the call.", "",
             "## Headline", "", tables.headline(rows), "", "## Per op", tables.op_tables(rows)]
    extra = bench_reports(rows)
    lines += [extra] if extra else []
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text("\n".join(lines) + "\n")
    if str(args.plots) != "none":
        from . import plot
        try:
            made = plot.plot_rows(rows, args.plots or out.parent, prefix=f"{tag}-")
            print("plots:", ", ".join(str(p) for p in made) or "none (no plottable rows)")
        except plot.MissingMatplotlib as exc:
            print(f"plots skipped: {exc}")
    print(tables.op_tables(rows))
    if extra:
        print(extra)
    print("\n## Headline\n\n" + tables.headline(rows))
    print(f"\nrows appended to {out}; summary in {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
