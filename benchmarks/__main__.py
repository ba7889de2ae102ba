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
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import tables
from .harness import REPO, RESULTS, RowsError, Settings, environment, latest_run, read_rows, run_bench

OPS = {"attention": "bench_attention", "masked_ce": "bench_masked_ce", "block_sparse": "bench_block_sparse",
       "train_step": "bench_train_step", "hf_patch": "bench_hf_patch", "overhead": "bench_overhead"}
PRESETS = ("smoke", "cpu", "gpu-check", "gpu")


def _seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds (0 or less spends every budget at once, nan never)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text!r}")
    return value


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _threads(text: str) -> int:
    """argparse type: 1 to the CPUs this process may use (more threads than CPUs time the contention)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if not 1 <= value <= _cpus():
        raise argparse.ArgumentTypeError(f"expected 1 to {_cpus()} (the CPUs this process may use), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--preset", choices=PRESETS, help="shape set (default: cpu on the CPU, gpu on a GPU)")
    p.add_argument("--ops", help=f"comma-separated subset of {','.join(OPS)} (default: all)")
    p.add_argument("--out", type=Path, help="results file to append to (default benchmarks/results/<device>-rows.jsonl)")
    p.add_argument("--summary", type=Path, help="markdown summary to write (default beside --out)")
    p.add_argument("--plots", type=Path, help="folder for PNG plots (default beside --out; 'none' to skip)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--budget-s", type=_seconds, default=None, help="stop starting new measurements after this long")
    p.add_argument("--cpu-time-s", type=_seconds, help="timing budget per provider on the CPU (default 2)")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: redraw the summary and plots from the newest run in --out")
    return p


def parse_args(argv=None, parser: argparse.ArgumentParser = None) -> argparse.Namespace:
    parser = parser or _parser()
    args = parser.parse_args(argv)
    if args.report_only:
        # --report-only measures nothing: a measuring flag would be silently ignored (--ops does not filter).
        given = [flag for flag, value in (("--ops", args.ops), ("--budget-s", args.budget_s),
                                          ("--cpu-time-s", args.cpu_time_s), ("--threads", args.threads),
                                          ("--no-memory", args.no_memory or None)) if value is not None]
        if given:
            parser.error(f"argument --report-only: measures nothing, so {', '.join(given)} would be ignored")
    args.cpu_time_s = 2.0 if args.cpu_time_s is None else args.cpu_time_s
    ops = (",".join(OPS) if args.ops is None else args.ops).split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        parser.error(f"argument --ops: unknown op(s) {', '.join(map(repr, unknown))} in {','.join(ops)!r}; "
                     f"choose from {','.join(OPS)}")
    args.ops = list(dict.fromkeys(ops))  # an op named twice would run twice into one run; its tables keep one
    return args


def _check_file(parser: argparse.ArgumentParser, flag: str, path: Path) -> None:
    """Refuse now, not after an hour of measuring, a file that cannot be written (a folder, a parent that is
    a file, no permission): open it for appending, which leaves an existing file as it is."""
    if path.is_dir():
        parser.error(f"argument {flag}: {path} is a directory; expected a file")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except (FileExistsError, NotADirectoryError):
        parser.error(f"argument {flag}: cannot write {path}: a folder above it is a file")
    except OSError as exc:
        parser.error(f"argument {flag}: cannot write {path}: {exc.strerror or exc}")
    if not existed:
        path.unlink()  # a run that stops before writing leaves no empty file behind


def _check_folder(parser: argparse.ArgumentParser, flag: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        parser.error(f"argument {flag}: {path} is a file; expected a folder (or 'none')")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parser.error(f"argument {flag}: cannot make the folder {path}: a folder above it is a file")
    except OSError as exc:
        parser.error(f"argument {flag}: cannot make the folder {path}: {exc.strerror or exc}")


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
    parser = _parser()
    args = parse_args(argv, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    preset = args.preset or ("cpu" if device == "cpu" else "gpu")
    if device == "cpu" and preset.startswith("gpu") and not args.report_only:
        # GPU shapes in bf16 on the CPU take hours and measure nothing the preset is for.
        why = "--cpu" if args.cpu else "no CUDA GPU is available"
        parser.error(f"argument --preset: {preset} is sized for a GPU, but this run is on the CPU ({why}); "
                     f"use smoke or cpu")
    tag = device_tag(device)
    out = args.out or RESULTS / f"{tag}-rows.jsonl"
    stem = out.name[: -len("rows.jsonl")] if out.name.endswith("rows.jsonl") else out.stem + "-"
    summary = args.summary or out.with_name(f"{stem}summary.md")
    plots = None if str(args.plots) == "none" else args.plots or out.parent
    settings = Settings(cpu_budget_s=args.cpu_time_s, memory=not args.no_memory)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s

    rows = []
    if args.report_only:
        if not out.is_file():
            parser.error(f"argument --out: no results file {out} (--report-only redraws a run written there)")
        try:
            rows = latest_run(read_rows(out))
        except RowsError as exc:
            parser.error(f"argument --out: {exc}")
        if not rows:
            parser.error(f"argument --out: {out} has no rows to report")
        settings.run_id = rows[0]["run"]
        # The summary's title names the rows' preset, not this command's default (rows before it say none).
        preset = args.preset or rows[0].get("preset", "not recorded")
    else:
        _check_file(parser, "--out", out)
        if out.is_file():
            # New rows appended after a corrupt or older line could not be tabulated or plotted later: say so now.
            try:
                read_rows(out)
            except RowsError as exc:
                parser.error(f"argument --out: {exc}")
    if summary.resolve() == out.resolve() and (out.is_file() or not out.exists()):  # (/dev/null for both is fine)
        parser.error(f"argument --summary: {summary} is the results file --out; writing it would replace the rows")
    _check_file(parser, "--summary", summary)
    if plots is not None:
        _check_folder(parser, "--plots", plots)
    interrupted = False
    try:
        for op in [] if args.report_only else args.ops:
            bench = importlib.import_module(f"benchmarks.{OPS[op]}")
            # A bench may declare MEASURE_MEMORY = False (per-call overhead: there is no memory to speak of).
            op_settings = dataclasses.replace(settings,
                                              memory=settings.memory and getattr(bench, "MEASURE_MEMORY", True))
            run_bench(bench, preset, device, op_settings, out, deadline, echo=lambda line: print(line, flush=True),
                      rows=rows)
    except KeyboardInterrupt:
        # Ctrl-C: every finished measurement is in --out already (and in rows); report those, exit as interrupted.
        interrupted = True
        print(f"\ninterrupted: the {len(rows)} rows measured so far are kept in {out}", flush=True)
        if not rows:
            return 130
    except OSError as exc:  # e.g. the disk filled up: the rows written so far stay in --out
        sys.exit(f"python -m benchmarks: error: cannot write {exc.filename or out}: {exc.strerror or exc}")

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
    if plots is not None:
        from . import plot
        try:
            # Named after --out, as the summary is: two results files in one folder keep their own plots.
            made = plot.plot_rows(rows, plots, prefix=stem)
            print("plots:", ", ".join(str(p) for p in made) or "none (no plottable rows)")
        except plot.MissingMatplotlib as exc:
            print(f"plots skipped: {exc}")
    print(tables.op_tables(rows))
    if extra:
        print(extra)
    print("\n## Headline\n\n" + tables.headline(rows))
    print(f"\n{'rows read from' if args.report_only else 'rows appended to'} {out}; summary in {summary}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
