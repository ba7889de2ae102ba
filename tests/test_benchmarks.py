"""CPU smoke tests of the benchmark suite: harness statistics, checks, rows, tables, plots, gpu_check's soft failure.

The benchmarks themselves are programs (python -m benchmarks); here they run at tiny shapes
only, to prove every provider either runs and passes its check or is skipped with a reason.
"""
import inspect
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from benchmarks import __main__ as cli
from benchmarks import bench_attention, bench_block_sparse, bench_masked_ce, bench_train_step, gpu_check, plot, tables
from benchmarks.harness import (Settings, Skip, Workload, cpu_peak_rss, percentile, rss_peak_of_call, run_bench,
                                summarise)
from fastmlm.testing import CheckFailed, check_error_ratios

REQUIRED = ("op", "provider", "shape", "dtype", "metric", "median", "p20", "p80", "unit", "device", "torch",
            "triton", "cuda", "commit", "date")
FAST = Settings(cpu_budget_s=0.02, cpu_min_reps=1, memory=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes on a shared 2-core runner: one thread avoids OpenMP spin-waits dominating every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_percentiles_interpolate():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert summarise(samples) == (3.0, pytest.approx(1.8), pytest.approx(4.2))
    assert percentile([7.0], 20) == 7.0


def test_compare_applies_the_error_ratio_rule():
    exact = {"out": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    lowp = {"out": exact["out"] + 1e-2}
    assert "out err" in check_error_ratios({"out": exact["out"] + 1.5e-2}, exact, lowp, {"out": 2.0})
    with pytest.raises(CheckFailed, match="out: error"):
        check_error_ratios({"out": exact["out"] + 5e-2}, exact, lowp, {"out": 2.0})
    with pytest.raises(CheckFailed, match="non-finite"):
        check_error_ratios({"out": torch.tensor([1.0, float("nan"), 3.0])}, exact, lowp, {"out": 2.0})
    with pytest.raises(CheckFailed, match="shape"):
        check_error_ratios({"out": torch.zeros(2)}, exact, lowp, {"out": 2.0})


def _fake_bench():
    """A bench module whose providers are good, wrong, unavailable and crashing."""
    x = torch.randn(64, dtype=torch.float64)

    def make(provider, shape, dtype, device):
        if provider == "missing":
            raise Skip("not installed here")
        if provider == "crashes":
            raise RuntimeError("boom inside the kernel")
        result = x * 2 if provider == "good" else x * 2 + 1
        check = lambda: check_error_ratios({"out": result}, {"out": x * 2}, {"out": x * 2 + 1e-9}, {"out": 2.0})
        return Workload(step=lambda: x * 2, check=check, flops=1e6)

    return types.SimpleNamespace(OP="fake", __name__="fake", make=make, label=lambda s: f"n={s['n']}",
                                 shapes=lambda preset: [{"n": 64, "pass": "fwd"}], dtypes=lambda p: [torch.float64],
                                 providers=lambda shape, device: ["good", "wrong", "missing", "crashes"])


def test_measure_times_good_providers_and_records_the_rest(tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = run_bench(_fake_bench(), "smoke", "cpu", FAST, out, echo=lambda line: None)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    by = {}
    for row in rows:
        by.setdefault(row["provider"], []).append(row)
        assert all(k in row for k in REQUIRED), sorted(set(REQUIRED) - set(row))
    good = {r["metric"]: r for r in by["good"]}
    assert set(good) == {"time", "TFLOP/s"} and good["time"]["status"] == "ok"
    assert good["time"]["p20"] <= good["time"]["median"] <= good["time"]["p80"]
    assert good["TFLOP/s"]["median"] == pytest.approx(1e6 / (good["time"]["median"] * 1e-3) / 1e12)
    # A wrong answer is never timed; a missing peer and a crash are recorded with their reasons.
    assert [(r["metric"], r["status"]) for r in by["wrong"]] == [("status", "failed check")]
    assert by["missing"][0]["status"] == "skipped" and by["missing"][0]["note"] == "not installed here"
    assert by["crashes"][0]["status"] == "error" and "boom inside the kernel" in by["crashes"][0]["note"]


def test_budget_spent_skips_with_a_note():
    rows = run_bench(_fake_bench(), "smoke", "cpu", FAST, None, deadline=0.0, echo=lambda line: None)
    assert {r["status"] for r in rows} == {"skipped"} and "budget" in rows[0]["note"]


def test_rss_peak_sees_a_large_allocation():
    big = rss_peak_of_call(lambda: torch.ones(64 << 18).sum())  # 64 MiB of fp32, written then freed
    small = rss_peak_of_call(lambda: None)
    assert big >= 60 * 2**20 and small < 8 * 2**20


def test_cpu_peak_memory_worker_sees_the_reference_logits():
    """Fresh-process RSS of the all-tokens reference covers its (T, V) fp32 logits, and not wildly more."""
    shape = {"tokens": 2048, "hidden": 32, "vocab": 4096, "rate": 0.15, "pass": "fwd+bwd"}
    peak = cpu_peak_rss("benchmarks.bench_masked_ce", "reference", shape, "fp32", timeout_s=120)
    logits = 2048 * 4096 * 4
    assert logits <= peak < 12 * logits, peak


@pytest.mark.parametrize("bench", [bench_attention, bench_masked_ce, bench_block_sparse, bench_train_step],
                         ids=lambda b: b.OP)
def test_smoke_preset_every_provider_runs_or_says_why(bench):
    rows = run_bench(bench, "smoke", "cpu", FAST, None, echo=lambda line: None)
    bad = [(r["provider"], r["shape"], r["note"]) for r in rows if r["status"] not in ("ok", "skipped")]
    assert not bad
    ran = {r["provider"] for r in rows if r["metric"] == "time"}
    expected = {"fastmlm"} if bench is bench_train_step else {"reference", "fastmlm-torch"}
    assert expected <= ran
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all(r["note"] for r in skipped)


def test_masked_ce_check_catches_a_wrong_loss(monkeypatch):
    shape = bench_masked_ce.shapes("smoke")[0]
    real = bench_masked_ce._provider_fn("torch-gathered", "cpu", torch.float32)
    monkeypatch.setattr(bench_masked_ce, "_provider_fn", lambda p, d, dt: lambda *a: real(*a) * 1.01)
    with pytest.raises(CheckFailed, match="loss"):
        bench_masked_ce.make("torch-gathered", shape, torch.float32, "cpu").check()


def _rows(op, provider, shape, metric, median, params=None, status="ok", note=""):
    return {"op": op, "provider": provider, "shape": shape, "dtype": "bf16", "metric": metric, "median": median,
            "p20": median, "p80": median, "unit": "", "status": status, "note": note, "run": "r1",
            "params": params or {}}


def test_tables_compute_speedups_against_reference_and_best_peer():
    rows = [_rows("attention", "reference", "s=512", "time", 8.0), _rows("attention", "reference", "s=512", "peak memory", 400.0),
            _rows("attention", "sdpa-flash", "s=512", "time", 2.0), _rows("attention", "flex", "s=512", "time", 3.0),
            _rows("attention", "fastmlm-triton", "s=512", "time", 1.0),
            _rows("attention", "fastmlm-triton", "s=512", "peak memory", 100.0),
            _rows("attention", "fastmlm-cuda", "s=512", "status", None, status="failed check", note="dq error")]
    table = tables.op_tables(rows)
    assert "vs best peer (sdpa-flash)" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| fastmlm-triton"))
    assert "| 8.00x | 2.00x |" in line and "| 4.00x |" in line  # time vs ref, vs sdpa-flash; memory vs ref
    assert "failed check: dq error" in table
    head = tables.headline(rows)
    assert "| fastmlm-triton | 1 | 8.00x | sdpa-flash | 2.00x |" in head and "fastmlm-cuda (failed check)" in head


def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for s in (128, 512):
        params = {"layout": "full", "heads": 12, "head_dim": 64, "pass": "fwd+bwd", "seqlen": s}
        rows.append(_rows("attention", "fastmlm-torch", f"s={s}", "TFLOP/s", s / 100, params))
    for t in (1000, 2000):
        params = {"tokens": t, "hidden": 8, "vocab": 16, "rate": 0.15}
        rows.append(_rows("masked_lm_loss", "reference", f"T={t}", "peak memory", t / 10, params))
    for d in (0.25, 1.0):
        params = {"seqlen": 64, "heads": 2, "head_dim": 16, "block": 16}
        rows += [_rows("block_sparse_attention", "fastmlm-torch", f"density={d:.3f}", "time", 4 * d, params),
                 _rows("block_sparse_attention", "dense-torch", f"density={d:.3f}", "time", 4.0, params)]
    made = plot.plot_rows(rows, tmp_path, prefix="t-")
    assert sorted(p.name for p in made) == ["t-attention-tflops.png", "t-block_sparse-time.png",
                                            "t-masked_ce-memory.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in made)


def test_plot_says_how_to_get_matplotlib(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(plot.MissingMatplotlib, match=r"pip install -e \"\.\[bench\]\""):
        plot.plot_rows([], "/tmp")


def test_cli_writes_rows_summary_and_tables(tmp_path, capsys):
    out = tmp_path / "cpu-rows.jsonl"
    code = cli.main(["--cpu", "--preset", "smoke", "--ops", "masked_ce", "--no-memory", "--out", str(out),
                     "--plots", "none", "--cpu-time-s", "0.02"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["provider"] for r in rows} >= {"reference", "fastmlm-torch", "torch-gathered", "liger", "cce"}
    summary = (tmp_path / "cpu-summary.md").read_text()
    assert "## Headline" in summary and "masked_lm_loss" in summary
    assert "### masked_lm_loss" in capsys.readouterr().out


def test_gpu_check_fails_soft_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    reports = list(tmp_path.glob("*-report.md"))
    assert len(reports) == 1 and len(list(tmp_path.iterdir())) <= 8
    text = reports[0].read_text()
    for step in ("build", "tests", "bench"):
        assert f"| {step} | skipped |" in text
    assert "no CUDA GPU" in text


def test_gpu_check_parses_pytest_verbose_output():
    output = "\n".join([
        "tests/test_attention.py::test_fwd[triton-bf16] PASSED [ 10%]",
        "tests/test_attention.py::test_bwd[cuda] FAILED [ 20%]",
        "tests/test_masked_ce.py::test_x SKIPPED (needs a CUDA GPU) [ 30%]",
        "some other line",
    ])
    groups, failed = gpu_check.parse_pytest(output)
    assert groups == {"tests/test_attention.py": {"PASSED": 1, "FAILED": 1}, "tests/test_masked_ce.py": {"SKIPPED": 1}}
    assert failed == ["tests/test_attention.py::test_bwd[cuda]"]


def test_gpu_check_stops_a_step_at_its_limit_and_keeps_the_log(tmp_path):
    log = tmp_path / "step.log"
    code, output = gpu_check.run_logged(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], log, timeout_s=2)
    assert code is None and "started" in output
    assert "stopped after the step's limit of 2 s" in log.read_text()


def test_available_memory_counts_the_page_cache_as_available(tmp_path):
    """The all-tokens reference's guard reads MemAvailable, not free pages (a CI runner's page cache
    leaves ~0 free: the guard then skipped a 160 MiB reference), and a cgroup limit net of its
    inactive page cache; absent, unreadable or odd files are skipped."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:           50000 kB\nMemAvailable:   20000000 kB\n")
    none = ()
    assert bench_masked_ce._available_bytes(str(meminfo), none) == 20000000 * 1024
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 << 30}\n")
    (v2 / "memory.current").write_text(f"{7 << 30}\n")
    (v2 / "memory.stat").write_text(f"anon 1024\ninactive_file {3 << 30}\n")
    cgroup = ((str(v2), "memory.max", "memory.current", "inactive_file"),)
    assert bench_masked_ce._available_bytes(str(meminfo), cgroup) == (8 - 7 + 3) << 30  # below MemAvailable
    (v2 / "memory.max").write_text("max\n")  # no limit
    assert bench_masked_ce._available_bytes(str(meminfo), cgroup) == 20000000 * 1024
    (v2 / "memory.stat").write_text("inactive_file lots\n")  # unreadable: skipped
    (v2 / "memory.max").write_text(f"{8 << 30}\n")
    assert bench_masked_ce._available_bytes(str(meminfo), cgroup) == 20000000 * 1024
    assert bench_masked_ce._available_bytes(str(tmp_path / "absent"), none) == 1 << 62
    assert bench_masked_ce._available_bytes() > 0  # this machine's own files


def _peer_workload(monkeypatch, provider, dtype):
    """The peer's loss function on the CPU: the builder bench_masked_ce uses on CUDA, past its device gate."""
    monkeypatch.setattr(bench_masked_ce, "_provider_fn", lambda p, d, dt: bench_masked_ce.PEERS[p](dt))
    return bench_masked_ce.make(provider, bench_masked_ce.shapes("smoke")[0], dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_liger_row_passes_its_check_under_the_interpreter(monkeypatch, dtype):
    """Liger's own Triton kernels, run by the interpreter: the argument order (weight, input, target, bias)
    and the bias are right, by the same error-ratio check the GPU row passes before it is timed."""
    pytest.importorskip("liger_kernel.transformers", reason="Liger Kernel is in the test extras")
    assert "limit" in _peer_workload(monkeypatch, "liger", dtype).check()


def _torch_cce(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False, filter_eps="high",
               impl="cce"):
    """What cut_cross_entropy.linear_cross_entropy computes (its kernels need a GPU), in fp32 torch."""
    return F.cross_entropy(e.float() @ c.float().T, targets, ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("provider", ["cce", "cce-exact"])
def test_cce_rows_fold_the_bias_into_the_projection(monkeypatch, provider):
    """CCE takes no bias: the bench folds it in as a column. With CCE's call signature (checked against the
    installed package) and its arithmetic in torch, loss and all three gradients pass the error-ratio check."""
    real = pytest.importorskip("cut_cross_entropy", reason="Cut Cross-Entropy is in the test extras")
    assert list(inspect.signature(real.linear_cross_entropy).parameters) == list(inspect.signature(_torch_cce).parameters)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", types.SimpleNamespace(linear_cross_entropy=_torch_cce))
    assert "limit" in _peer_workload(monkeypatch, provider, torch.float16).check()
    with pytest.raises(Skip, match="bf16 or fp16"):
        bench_masked_ce.PEERS[provider](torch.float32)
