"""The benchmark harness: check, time, measure memory, write rows, print tables.

Every ``bench_<op>.py`` describes its work as :class:`Workload` objects (one per
provider and shape); this module does the rest the same way for every op:

  1. build the workload; a provider that cannot run here raises :class:`Skip`
     (or fastmlm's ``BackendUnavailable``) and gets a "skipped" row with the reason;
  2. check its output against the reference (``Workload.check``, the error-ratio
     rule of :mod:`fastmlm.testing`); a failed check gets a "failed check" row and
     is never timed;
  3. time it: on a GPU with ``triton.testing.do_bench`` (warm-up, then the
     20/50/80th percentiles of many runs, L2 flushed between runs), or with CUDA
     events when triton is missing; on the CPU with ``time.perf_counter`` around
     whole calls, after a warm-up, repeated until a time budget is spent;
  4. measure peak memory: on a GPU ``torch.cuda.max_memory_allocated`` during one
     call, minus what was allocated before it (the inputs); on the CPU the peak
     resident set size (VmHWM, reset through /proc/self/clear_refs) during one
     call minus the resident size just before it, in a fresh subprocess whose
     malloc returns every large block to the OS on free (see :func:`cpu_peak_rss`).
     Steps drop their gradients at the end, so the peak counts the gradients each
     call produces as well as its temporaries, and the baseline holds only the inputs;
  5. append one row per metric to a JSONL results file.

A row: op, provider, shape (a label), dtype, metric, median, p20, p80, unit, status,
note, device, torch, triton, cuda, commit, date, threads, load (the host's load
average: CPU timings on a shared machine need it), run (one id per invocation),
preset, pass and params (the shape as a dict, for plots). ``status`` is "ok", "skipped",
"failed check" or "error"; non-ok rows carry the reason in ``note`` and no numbers.
"""
from __future__ import annotations

import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from fastmlm.ops import BackendUnavailable
from fastmlm.testing import CheckFailed  # a provider's check raises it (fastmlm.testing.check_error_ratios)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MIB = 1 << 20


class Skip(Exception):
    """This provider cannot run here (missing package, unsupported device or shape); the message says why."""


@dataclass
class Workload:
    """One provider at one shape, ready to run.

    step:  the call that is timed and measured (e.g. forward + backward); its
           result is discarded.
    check: runs the provider once more and compares with the reference; returns
           a short note (the measured errors) or raises CheckFailed.
    flops: useful floating-point operations of one step (for TFLOP/s), or None.
    tokens: tokens processed by one step (for tokens/s), or None.
    """

    step: Callable[[], object]
    check: Callable[[], str]
    flops: Optional[float] = None
    tokens: Optional[float] = None


# --------------------------------------------------------------------------- environment
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        name = match.group(1).strip() if match else platform.processor()
    except OSError:
        name = platform.processor() or "cpu"
    return f"{name} ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    """The fields every row carries: device name, versions, git commit, date (UTC)."""
    on_gpu = device.startswith("cuda")
    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else cpu_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": torch.get_num_threads(),  # CPU threads torch used
        "load": load,  # the host's 1/5/15-minute load average when the op's run started
    }


# --------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile, q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of timing samples."""
    return percentile(samples_ms, 50), percentile(samples_ms, 20), percentile(samples_ms, 80)


# --------------------------------------------------------------------------- timing
def time_cpu(step: Callable, budget_s: float = 2.0, min_reps: int = 3, max_reps: int = 50,
             warm_up: bool = True, cap_s: float = 60.0) -> list[float]:
    """Wall-clock milliseconds of whole calls.

    A warm-up (unless the caller just ran one), then repeat until ``budget_s`` is spent
    and at least ``min_reps`` samples exist, but stop starting new calls after
    ``cap_s``: a call that takes minutes gets one sample, and the row shows p20 = p80.
    """
    if warm_up:
        step()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps:
        elapsed = time.perf_counter() - start
        if samples and (elapsed >= cap_s or (len(samples) >= min_reps and elapsed >= budget_s)):
            break
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def time_gpu(step: Callable, warmup_ms: int = 25, rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds on the current CUDA device."""
    try:
        from triton.testing import do_bench
    except ImportError:  # no triton: CUDA events around each call after a warm-up
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        samples = []
        for _ in range(30):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        return summarise(samples)
    # do_bench sizes its repetitions from rep_ms: give slow steps (a training step) at least ~10 samples.
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    step()
    end.record()
    end.synchronize()
    rep_ms = int(min(3000, max(rep_ms, 10 * begin.elapsed_time(end))))
    median, p20, p80 = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


# --------------------------------------------------------------------------- memory
def gpu_peak_bytes(step: Callable, device) -> int:
    """Peak bytes allocated by one call above what was allocated before it."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {key}")
    return int(match.group(1))


def rss_peak_of_call(step: Callable, warm_up: bool = True) -> int:
    """In this process: peak RSS during one call minus the RSS just before it, in bytes.

    Honest only in a process whose allocator returns freed blocks to the OS
    (see :func:`cpu_peak_rss`); with ``warm_up`` the call runs once first so lazy
    initialisation (thread pools, caches: a few MiB) is not counted.
    """
    if warm_up:
        step()
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    step()
    return max(0, _status_kib("VmHWM") - before) * 1024


# glibc: every block >= 64 KiB is mmapped and unmapped on free (a fixed threshold also turns
# off glibc's adaptive threshold), so RSS follows the live tensors instead of a retained heap.
_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "TRITON_INTERPRET": "0"}


def cpu_peak_rss(module: str, provider: str, shape: dict, dtype: str, timeout_s: float = 1800,
                 warm_up: bool = True) -> int:
    """Peak RSS above the inputs for one call, measured in a fresh Python process."""
    spec = json.dumps({"module": module, "provider": provider, "shape": shape, "dtype": dtype, "warm_up": warm_up})
    env = {**os.environ, **_WORKER_ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", "--memory-worker", spec], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_BYTES ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory worker failed (exit {proc.returncode}): {tail[0]}")
    return int(lines[-1].split()[1])


def _memory_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    module = importlib.import_module(spec["module"])
    workload = module.make(spec["provider"], spec["shape"], dtype_of(spec["dtype"]), "cpu")
    print("PEAK_BYTES", rss_peak_of_call(workload.step, spec.get("warm_up", True)), flush=True)


# --------------------------------------------------------------------------- one measurement
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def dtype_of(name: str) -> torch.dtype:
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass
class Settings:
    """How hard to measure: CPU time budget per provider, GPU do_bench windows, memory on/off."""

    cpu_budget_s: float = 2.0
    cpu_min_reps: int = 3
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    memory: bool = True
    # The start time (newest sorts last) and a random tag: two runs started in the same second (in parallel,
    # into one results file) would otherwise share an id, and --report-only would merge their rows.
    run_id: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-")
                        + os.urandom(3).hex())


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    text = re.sub(r"\s+", " ", text)
    return text[:400] if isinstance(exc, (Skip, BackendUnavailable, CheckFailed)) else \
        f"{type(exc).__name__}: {text[:300]}"


def measure(bench, provider: str, shape: dict, dtype: torch.dtype, device: str, settings: Settings,
            env: dict) -> list[dict]:
    """Check, time and measure one provider at one shape; return its rows."""
    base = {"op": bench.OP, "provider": provider, "shape": bench.label(shape), "dtype": dtype_name(dtype),
            "pass": shape.get("pass", ""), **env, "run": settings.run_id, "params": shape}

    def status_row(status: str, note: str) -> list[dict]:
        return [{**base, "metric": "status", "median": None, "p20": None, "p80": None, "unit": "",
                 "status": status, "note": note}]

    try:
        workload = bench.make(provider, shape, dtype, device)
        check_note = workload.check()
    except (Skip, BackendUnavailable) as exc:
        return status_row("skipped", _reason(exc))
    except CheckFailed as exc:
        return status_row("failed check", _reason(exc))
    except Exception as exc:  # noqa: BLE001 - a crashing provider is a result, recorded, not fatal
        return status_row("error", _reason(exc))

    rows = []

    def add(metric, unit, median, p20, p80, note=check_note):
        rows.append({**base, "metric": metric, "median": median, "p20": p20, "p80": p80, "unit": unit,
                     "status": "ok", "note": note})

    try:
        if device.startswith("cuda"):
            median, p20, p80 = time_gpu(workload.step, settings.gpu_warmup_ms, settings.gpu_rep_ms)
        else:
            # The check just ran the provider once: that was the warm-up.
            median, p20, p80 = summarise(time_cpu(workload.step, settings.cpu_budget_s, settings.cpu_min_reps,
                                                  warm_up=False))
    except Exception as exc:  # noqa: BLE001
        return status_row("error", "while timing: " + _reason(exc))
    add("time", "ms", median, p20, p80)
    # Throughput from the same samples: the faster percentile gives the higher rate.
    if workload.flops:
        rate = lambda ms: workload.flops / (ms * 1e-3) / 1e12
        add("TFLOP/s", "TFLOP/s", rate(median), rate(p80), rate(p20))
    if workload.tokens:
        rate = lambda ms: workload.tokens / (ms * 1e-3)
        add("tokens/s", "tokens/s", rate(median), rate(p80), rate(p20))

    if settings.memory:
        try:
            if device.startswith("cuda"):
                peak, how = gpu_peak_bytes(workload.step, torch.device(device)), "max_memory_allocated above inputs"
            else:
                del workload
                gc.collect()
                # A call of many seconds dwarfs lazy initialisation: spare it the warm-up call.
                peak = cpu_peak_rss(bench.__name__, provider, shape, dtype_name(dtype), warm_up=median < 10e3)
                how = "peak RSS above inputs, fresh process"
            add("peak memory", "MiB", peak / MIB, peak / MIB, peak / MIB, how)
        except Exception as exc:  # noqa: BLE001
            rows.append({**base, "metric": "peak memory", "median": None, "p20": None, "p80": None, "unit": "MiB",
                         "status": "error", "note": _reason(exc)})
    return rows


def run_bench(bench, preset: str, device: str, settings: Settings, out: Optional[Path],
              deadline: Optional[float] = None, echo: Callable[[str], None] = print,
              rows: Optional[list] = None) -> list[dict]:
    """Every shape x dtype x provider of one bench module; rows are appended to ``out`` as they come.

    ``rows``: a list to extend as each measurement finishes (and return), so a caller interrupted by
    Ctrl-C still holds the rows measured so far.
    """
    env = {**environment(device), "preset": preset}  # every row says its preset (for --report-only's summary)
    rows = [] if rows is None else rows
    for shape in bench.shapes(preset):
        for dtype in bench.dtypes(preset):
            for provider in bench.providers(shape, device):
                if deadline is not None and time.monotonic() > deadline:
                    new = [{"op": bench.OP, "provider": provider, "shape": bench.label(shape),
                            "dtype": dtype_name(dtype), "pass": shape.get("pass", ""), **env, "run": settings.run_id,
                            "params": shape, "metric": "status", "median": None, "p20": None, "p80": None, "unit": "",
                            "status": "skipped", "note": "time budget of this benchmark run spent"}]
                else:
                    new = measure(bench, provider, shape, dtype, device, settings, env)
                    gc.collect()
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                echo(one_line(new))
                rows.extend(new)
                if out is not None:
                    append_rows(out, new)
    return rows


def one_line(rows: list[dict]) -> str:
    head = rows[0]
    where = f"{head['op']:<22} {head['provider']:<22} {head['shape']:<40} {head['dtype']}"
    if head["status"] != "ok":
        return f"{where}  {head['status']}: {head['note'][:120]}"
    parts = [f"{r['metric']} {r['median']:.4g} {r['unit']}" for r in rows if r["median"] is not None]
    return f"{where}  " + ", ".join(parts)


# --------------------------------------------------------------------------- results file
def append_rows(path: Path, rows: list[dict]) -> None:
    """Append whole lines, one ``write`` per batch (an O_APPEND write is not interleaved with another run's).

    A file whose last line was cut short (a full disk, a copy cut off) gets a newline first: the damage
    stays on its own line, which :func:`read_rows` names, instead of swallowing this batch's first row.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with open(path, "a+b", buffering=0) as fh:
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                data = b"\n" + data
        view = memoryview(data)
        while view:  # a regular file takes it in one call; loop in case of a short write
            view = view[fh.write(view):]


# The fields tables, plots and --report-only read: a line without them is corrupt or from an older harness.
ROW_FIELDS = ("op", "provider", "shape", "dtype", "metric", "median", "p20", "p80", "unit", "status", "note",
              "device", "torch", "triton", "cuda", "commit", "date", "run")


class RowsError(ValueError):
    """A results file line that is not a row of this harness; the message names the file and line."""


def parse_row(line: str, path, number: int) -> dict:
    """Line ``number`` of the results file ``path`` as a row; RowsError naming both when it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RowsError(f"{path}:{number}: not a JSON row (column {exc.colno}: {exc.msg}); delete or "
                        "repair that line") from None
    missing = [k for k in ROW_FIELDS if k not in row] if isinstance(row, dict) else ["every field"]
    if missing:
        raise RowsError(f"{path}:{number}: not a row of this benchmark harness (missing "
                        f"{', '.join(missing)}): a file from an older version? write new runs to a new file")
    return row


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [parse_row(line, path, number) for number, line in enumerate(fh, 1) if line.strip()]


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the newest run in a results file."""
    if not rows:
        return []
    newest = max(r["run"] for r in rows)
    return [r for r in rows if r["run"] == newest]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        _memory_worker(sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks.harness --memory-worker SPEC_JSON (used by the harness itself)")
