"""The one GPU entry point (``make gpu-check``): build, GPU test tier, benchmarks, report, in one run.

    python benchmarks/gpu_check.py --out DIR        # DIR defaults to benchmarks/results

Steps, each with its own time budget inside an overall budget (default 420 s, to
finish within 8 minutes on an H100 with start-up and slack); a step that runs out
of time is stopped and noted, and the next one still runs:

  1. build   FASTMLM_BUILD_CUDA=1 python setup.py build_ext --inplace, for this GPU's
             architecture only, MAX_JOBS = CPU count
  2. tests   pytest -m "gpu or interpreter" tests/, per-test timeout (pytest-timeout)
  3. bench   python -m benchmarks --preset gpu-check, one subprocess per op (a CUDA
             fault in one op cannot take the others down)
  4. report  into DIR, flat and small (at most 8 files), named by date and GPU:
             <date>-<gpu>-report.md, -rows.jsonl, -build.log, -pytest.log, -bench.log
             (log tails) and three PNG plots

It uses the Python, torch and triton it runs under; the one thing it installs is the
peers' wheels found in --wheels DIR (default .whl, from `make gpu-wheels`; see
benchmarks/peer_wheels.py), into a folder outside the repo, so that the masked loss's
Liger and CCE rows exist on a machine without a package registry. Without a
CUDA GPU it fails soft: it skips the build, the GPU tier and the GPU benchmarks,
writes a report saying so, and exits 0 (--cpu-smoke tries the script itself: the
tests step runs a few CPU tests through the same pytest parsing, the benchmark step
runs the pipeline at tiny CPU shapes, and the report and plots are written as on a
GPU, marked as a smoke run; tests/test_gpu_check.py runs it). Exit status on a GPU:
0 when every step passed, 1 otherwise. The summary table is printed last.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO))

try:
    import torch
except ImportError:  # a python without torch (e.g. a bare python3 on a CPU machine): try the repo's venv
    _VENV = REPO / ".venv" / "bin" / "python"
    if _VENV.exists() and Path(sys.prefix).resolve() != _VENV.parents[1].resolve():
        print(f"[gpu_check] {sys.executable} has no torch; re-running under {_VENV}", flush=True)
        os.execv(str(_VENV), [str(_VENV), str(Path(__file__).resolve()), *sys.argv[1:]])
    print(f"[gpu_check] {sys.executable} cannot import torch: nothing to check; skipped every step (exit 0)")
    sys.exit(0)

from benchmarks import peer_wheels, tables  # noqa: E402
from benchmarks.__main__ import bench_reports, device_tag  # noqa: E402
from benchmarks.harness import RowsError, environment, parse_row, read_rows  # noqa: E402

# Seconds per step (the overall budget caps their sum); benchmarks are split per op.
STEP_BUDGET = {"build": 200, "tests": 150, "bench": 200}
BENCH_SHARE = {"attention": 0.3, "masked_ce": 0.2, "block_sparse": 0.2, "train_step": 0.15, "hf_patch": 0.15,
               "overhead": 0.1}
PER_TEST_TIMEOUT_S = 90
SMOKE_TESTS = ["tests/test_dispatch.py", "-k", "score_elements or order or precise"]  # CPU-only, seconds
LOG_TAIL_LINES = 300


class Step:
    """One step's outcome for the report."""

    def __init__(self, name: str):
        self.name, self.status, self.seconds, self.note = name, "not run", 0.0, ""

    def done(self, status: str, started: float, note: str = "") -> "Step":
        self.status, self.seconds, self.note = status, time.monotonic() - started, note
        return self


def run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run a command with a wall-clock limit; keep the tail of its output in ``log``.

    Returns (exit code or None when it was stopped at the limit, full output).
    """
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, timeout_s))
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (exc.stdout, exc.stderr))
        output += f"\n[gpu_check] stopped after the step's limit of {timeout_s:.0f} s\n"
    tail = output.splitlines()[-LOG_TAIL_LINES:]
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n" + "\n".join(tail) + "\n")
    return code, output


def gpu_arch() -> str:
    """This GPU's architecture for TORCH_CUDA_ARCH_LIST (one arch compiles faster than setup.py's two)."""
    try:
        major, minor = torch.cuda.get_device_capability()
    except (AssertionError, RuntimeError):
        return "8.0;9.0a"
    return f"{major}.{minor}" + ("a" if major == 9 else "")


# --------------------------------------------------------------------------- steps
def step_build(has_gpu: bool, log: Path, budget: float, args) -> Step:
    step, start = Step("build"), time.monotonic()
    if args.no_build:
        return step.done("skipped", start, "--no-build given")
    if not has_gpu:
        return step.done("skipped", start, "no CUDA GPU (torch.cuda.is_available() is False)")
    if not (list((REPO / "csrc").glob("*.cu")) or list((REPO / "csrc").glob("*.cpp"))):
        return step.done("skipped", start, "csrc/ has no CUDA sources yet")
    env = {**os.environ, "FASTMLM_BUILD_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", gpu_arch())}
    code, output = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], log, budget, env)
    if code is None:
        return step.done("timed out", start, f"build stopped at {budget:.0f} s; see {log.name}")
    if code != 0:
        last = [ln for ln in output.splitlines() if "error" in ln.lower()][-1:] or output.splitlines()[-1:]
        return step.done("failed", start, f"exit {code}: {last[0][:200] if last else ''}")
    return step.done("passed", start, f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}")


_TEST_LINE = re.compile(r"^(tests/[^:\s]+)::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def parse_pytest(output: str) -> tuple[dict, list[str]]:
    """Per test file counts {file: {outcome: n}} and the failed/errored test ids, from ``pytest -v`` output."""
    groups: dict[str, dict[str, int]] = {}
    failed = []
    for line in output.splitlines():
        match = _TEST_LINE.match(line.strip())
        if match:
            path, name, outcome = match.groups()
            counts = groups.setdefault(path, {})
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in ("FAILED", "ERROR"):
                failed.append(f"{path}::{name}")
    return groups, failed


def step_tests(has_gpu: bool, log: Path, budget: float, cpu_smoke: bool = False) -> tuple[Step, dict, list[str]]:
    step, start = Step("tests"), time.monotonic()
    if not has_gpu and not cpu_smoke:
        return step.done("skipped", start, "no CUDA GPU: the gpu tier would only skip"), {}, []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real kernels, not the interpreter
    # One Triton config per kernel in the tests: tuning every test shape would not fit the budget.
    # The benchmarks step keeps autotuning on.
    env["FASTMLM_TRITON_AUTOTUNE"] = "0"
    selection = ["-m", "gpu or interpreter", "tests/"] if has_gpu else ["-m", "not gpu", *SMOKE_TESTS]
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--timeout={PER_TEST_TIMEOUT_S}",
           "-rfE", *selection]
    code, output = run_logged(cmd, log, budget, env)
    groups, failed = parse_pytest(output)
    ran = sum(sum(c.values()) for c in groups.values())
    if code is None:
        return step.done("timed out", start, f"stopped at {budget:.0f} s after {ran} tests"), groups, failed
    if code == 5:
        return step.done("no tests", start, "pytest collected no gpu/interpreter tests"), groups, failed
    status = "passed" if code == 0 else "failed"
    skipped = sum(c.get("SKIPPED", 0) for c in groups.values())
    what = "" if has_gpu else "CPU smoke selection, not the GPU tier: "
    return step.done(status, start, f"{what}{ran} tests: {len(failed)} failed or errored, {skipped} skipped"), \
        groups, failed


def step_bench(has_gpu: bool, rows_path: Path, log: Path, budget: float, args) -> tuple[Step, list[dict]]:
    step, start = Step("bench"), time.monotonic()
    if not has_gpu and not args.cpu_smoke:
        return step.done("skipped", start, "no CUDA GPU: no GPU figures (CPU figures come from `make bench`)"), []
    preset, extra = ("gpu-check", []) if has_gpu else ("smoke", ["--cpu", "--no-memory", "--cpu-time-s", "0.2"])
    notes, ok = [], True
    # The overhead bench times the Python layer per call: on the CPU smoke run its figures would mean
    # nothing (CPU figures: python -m benchmarks --cpu --ops overhead --threads 1), so only a GPU runs it.
    ops = [op for op in BENCH_SHARE if has_gpu or op != "overhead"]
    for i, op in enumerate(ops):
        # Share what is left among the ops still to run, so time one op leaves unused goes to the next.
        remaining = budget - (time.monotonic() - start)
        op_budget = remaining * BENCH_SHARE[op] / sum(BENCH_SHARE[o] for o in ops[i:])
        if op_budget < 5:
            notes.append(f"{op}: skipped, benchmark budget spent")
            ok = False
            continue
        # The op's own --budget-s stops new measurements; the process limit adds room to finish one.
        cmd = [sys.executable, "-m", "benchmarks", "--preset", preset, "--ops", op, "--out", str(rows_path),
               "--plots", "none", "--summary", os.devnull, "--budget-s", f"{0.8 * op_budget:.0f}"] + extra
        code, _ = run_logged(cmd, log, op_budget, dict(os.environ))
        if code != 0:
            ok = False
            notes.append(f"{op}: {'stopped at its time limit' if code is None else f'exit {code}'}")
        dropped = drop_unreadable_lines(rows_path)
        if dropped:  # an op stopped while writing: the next op would refuse to append after such a line
            ok = False
            notes.append(f"{op}: {dropped} unreadable line(s) of {rows_path.name} dropped")
    rows = read_rows(rows_path) if rows_path.exists() else []
    # A peer that fails the error-ratio check (CCE's default gradient filter may) is a finding about the
    # peer, listed but not a failure of ours; a peer that errors is more likely our adapter's fault.
    bad = [r for r in rows if r["status"] == "error" or (r["status"] == "failed check" and
                                                          tables.kind(r["provider"]) != "peer")]
    peers = sorted({r["provider"] for r in rows if r["status"] == "failed check" and r not in bad})
    if bad:
        notes.append(f"{len(bad)} rows failed their check or errored")
    if peers:
        notes.append(f"peers failing the check (not timed): {', '.join(peers)}")
    status = "passed" if ok and not bad else "failed"
    return step.done(status, start, "; ".join(notes) or f"{len(rows)} rows"), rows


def drop_unreadable_lines(path: Path) -> int:
    """Remove the lines of a rows file that read_rows would refuse (a line cut short when an op's process
    was stopped at its limit mid-write); return how many. The rows of the other ops stay readable."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    good = []
    for number, line in enumerate(lines, 1):
        try:
            parse_row(line, path, number)
        except RowsError:
            continue
        good.append(line + "\n")
    if len(good) < len(lines):
        path.write_text("".join(good))
    return len(lines) - len(good)


# --------------------------------------------------------------------------- report
def _cmd_output(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return "not available"


def describe_machine(has_gpu: bool, wheels: str) -> list[str]:
    env = environment("cuda" if has_gpu else "cpu")
    nvcc = _cmd_output(["nvcc", "--version"]).splitlines()
    smi = _cmd_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    # In a fresh interpreter: the build step may have compiled it after this process imported fastmlm.
    helper = _cmd_output([sys.executable, "-c", "import fastmlm.ops.checks as c; "
                          "print('built' if c.native_boundary else 'absent (the Python versions run)')"])
    return [f"- device: {env['device']}" + (f" (nvidia-smi: {smi})" if has_gpu else ""),
            f"- python {platform.python_version()}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}",
            f"- nvcc: {nvcc[-1] if nvcc else 'not available'}",
            f"- C boundary helpers (fastmlm/ops/_boundary.c): {helper.splitlines()[-1] if helper else 'unknown'}",
            f"- peers: {peer_wheels.versions()} (wheels: {wheels})",
            f"- git commit {env['commit']}, {env['date']}"]


def write_report(path: Path, machine: list[str], steps: list[Step], groups: dict, failed: list[str],
                 rows: list[dict], files: list[Path], started: float, preset: str = "gpu-check") -> str:
    summary = ["| step | status | seconds | note |", "|---|---|---|---|"]
    summary += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.note} |" for s in steps]
    lines = [f"# GPU check: {path.stem.replace('-report', '')}", "", *machine,
             f"- total wall time {time.monotonic() - started:.0f} s", "", "## Steps", "", *summary, ""]
    if preset == "smoke":
        lines[2:2] = ["**CPU smoke run** (`--cpu-smoke`): tries this script; no GPU figure comes from it.", ""]
    if groups:
        lines += ["## GPU test tier", "", "| test file | passed | failed | error | skipped |", "|---|---|---|---|---|"]
        for file, c in sorted(groups.items()):
            lines.append(f"| {file} | {c.get('PASSED', 0)} | {c.get('FAILED', 0)} | {c.get('ERROR', 0)} | "
                         f"{c.get('SKIPPED', 0)} |")
        if failed:
            lines += ["", "Failed or errored:", ""] + [f"- `{t}`" for t in failed[:40]]
        lines.append("")
    if rows:
        lines += [f"## Benchmarks (preset {preset})", "", tables.headline(rows), "", tables.op_tables(rows), ""]
        lines += [bench_reports(rows), ""]  # per-bench reports (overhead: the µs the Python layer adds)
    lines += ["## Files", ""] + [f"- `{f.name}`" for f in files]
    path.write_text("\n".join(lines) + "\n")
    return "\n".join(summary) + ("\n\n" + tables.headline(rows) if rows else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="build + GPU test tier + benchmarks + report, in one run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="report folder (kept flat)")
    p.add_argument("--budget-s", type=float, default=420.0, help="overall time budget in seconds (8 min with slack)")
    p.add_argument("--no-build", action="store_true", help="use the extension already built")
    p.add_argument("--wheels", type=Path, default=peer_wheels.WHEELS, help="install the peers' wheels in this "
                   "folder first (default .whl: make gpu-wheels)")
    p.add_argument("--cpu-smoke", action="store_true", help="without a GPU, still run the benchmark step at tiny "
                                                            "CPU shapes (tries the pipeline; not GPU figures)")
    args = p.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    has_gpu = torch.cuda.is_available()
    tag = device_tag("cuda") if has_gpu else time.strftime("%Y-%m-%d", time.gmtime()) + "-nogpu"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    build_log, test_log, bench_log = (out / f"{tag}-{name}.log" for name in ("build", "pytest", "bench"))
    rows_path, report = out / f"{tag}-rows.jsonl", out / f"{tag}-report.md"
    for stale in (build_log, test_log, bench_log, rows_path):  # one report per run and name
        stale.unlink(missing_ok=True)

    wheels = peer_wheels.install(args.wheels)
    print(f"[gpu_check] peers: {wheels}", flush=True)

    def budget(step: str, later: tuple[str, ...]) -> float:
        reserve = sum(min(STEP_BUDGET[s], 60) for s in later)  # keep a minimum for the steps after this one
        return max(0.0, min(STEP_BUDGET[step], deadline - time.monotonic() - reserve))

    steps = [step_build(has_gpu, build_log, budget("build", ("tests", "bench")), args)]
    print(f"[gpu_check] build: {steps[-1].status} ({steps[-1].seconds:.0f} s) {steps[-1].note}", flush=True)
    test_step, groups, failed = step_tests(has_gpu, test_log, budget("tests", ("bench",)), args.cpu_smoke)
    steps.append(test_step)
    print(f"[gpu_check] tests: {test_step.status} ({test_step.seconds:.0f} s) {test_step.note}", flush=True)
    bench_step, rows = step_bench(has_gpu, rows_path, bench_log, budget("bench", ()), args)
    steps.append(bench_step)
    print(f"[gpu_check] bench: {bench_step.status} ({bench_step.seconds:.0f} s) {bench_step.note}", flush=True)

    files = [f for f in (rows_path, build_log, test_log, bench_log) if f.exists()]
    if rows:
        try:
            from benchmarks import plot
            files += plot.plot_rows(rows, out, prefix=f"{tag}-")
        except Exception as exc:  # noqa: BLE001 - plots are a nicety; the report must still be written
            print(f"[gpu_check] plots skipped: {exc}")
    files.insert(0, report)
    summary = write_report(report, describe_machine(has_gpu, wheels), steps, groups, failed, rows, files, started,
                           "gpu-check" if has_gpu else "smoke")
    print(f"\n[gpu_check] report: {report}\n")
    print(summary)
    if not has_gpu:
        if args.cpu_smoke:  # the smoke run tries the script: its own steps must pass
            ok = all(s.status in ("passed", "skipped") for s in steps)
            print(f"\n[gpu_check] CPU smoke run (no GPU figures): {'passed' if ok else 'FAILED'}")
            return 0 if ok else 1
        print("\n[gpu_check] no CUDA GPU here: build, GPU tests and GPU benchmarks were skipped (exit 0)")
        return 0
    return 0 if all(s.status in ("passed", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
