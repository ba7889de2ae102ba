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


# --------------------------------------------------------------------------- the CLI as a new user meets it
def _cli_fake(monkeypatch, interrupt_at=None):
    """``--ops fake``: a two-provider bench that counts its calls to make (and can raise Ctrl-C in one)."""
    made = []

    def make(provider, shape, dtype, device):
        made.append(provider)
        if provider == interrupt_at:
            raise KeyboardInterrupt
        return Workload(step=lambda: None, check=lambda: "ok")

    bench = types.SimpleNamespace(OP="fake", __name__="benchmarks.fake_bench", make=make, label=lambda s: "n=1",
                                  shapes=lambda preset: [{"n": 1}], dtypes=lambda preset: [torch.float64],
                                  providers=lambda shape, device: ["reference", "fastmlm-torch"])
    monkeypatch.setitem(cli.OPS, "fake", "fake_bench")
    monkeypatch.setitem(sys.modules, "benchmarks.fake_bench", bench)
    return made


def _cli_args(tmp_path, *extra):
    return ["--cpu", "--preset", "smoke", "--ops", "fake", "--no-memory", "--cpu-time-s", "0.01",
            "--out", str(tmp_path / "rows.jsonl"), "--plots", "none", *extra]


def _usage_error(capsys, argv) -> str:
    """main(argv) must stop as argparse does (exit 2, usage + one error line); returns that line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage:"), (exc.value.code, err)
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("ops", ["masked_ce,bogus", "masked_ce,", ""])
def test_cli_refuses_unknown_ops_as_a_usage_error(tmp_path, capsys, ops):
    line = _usage_error(capsys, ["--cpu", "--ops", ops, "--out", str(tmp_path / "rows.jsonl")])
    assert "argument --ops: unknown op(s)" in line and "choose from attention,masked_ce" in line
    assert not (tmp_path / "rows.jsonl").exists()


def test_cli_runs_an_op_named_twice_once(tmp_path, monkeypatch):
    made = _cli_fake(monkeypatch)
    assert cli.main(_cli_args(tmp_path, "--ops", "fake,fake")) == 0
    assert made == ["reference", "fastmlm-torch"]


@pytest.mark.parametrize("flag,value", [("--budget-s", "0"), ("--budget-s", "-1"), ("--budget-s", "nan"),
                                        ("--cpu-time-s", "0"), ("--cpu-time-s", "inf"), ("--threads", "0"),
                                        ("--threads", "-1"), ("--threads", "100000")])
def test_cli_refuses_numbers_that_would_measure_nothing_or_nonsense(tmp_path, monkeypatch, capsys, flag, value):
    """--budget-s 0 skipped every row, nan never stopped, --threads 0 was ignored and -1 a traceback."""
    made = _cli_fake(monkeypatch)
    line = _usage_error(capsys, _cli_args(tmp_path, flag, value))
    assert f"argument {flag}: expected" in line and not made


def test_cli_checks_its_output_paths_before_measuring(tmp_path, monkeypatch, capsys):
    made = _cli_fake(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("kept\n")
    cases = {"--out": [str(tmp_path), str(a_file / "rows.jsonl")], "--summary": [str(tmp_path), str(a_file / "s.md")],
             "--plots": [str(a_file), str(a_file / "plots")]}
    for flag, paths in cases.items():
        for path in paths:
            line = _usage_error(capsys, _cli_args(tmp_path, flag, path))
            assert f"argument {flag}: " in line and path in line, line
    assert not made and a_file.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no empty rows or summary file left


def test_cli_report_only_names_a_missing_empty_corrupt_or_older_file(tmp_path, monkeypatch, capsys):
    _cli_fake(monkeypatch)
    out = tmp_path / "rows.jsonl"
    assert cli.main(_cli_args(tmp_path)) == 0
    good = out.read_text()
    report = ["--report-only", "--cpu", "--plots", "none", "--out", str(out)]
    out.unlink()
    assert "no results file" in _usage_error(capsys, report)
    out.write_text("\n")
    assert "has no rows" in _usage_error(capsys, report)
    out.write_text(good + '{"op": "fake", "provi\n')
    assert f"{out}:3: not a JSON row" in _usage_error(capsys, report)
    old = [{k: v for k, v in json.loads(line).items() if k != "run"} for line in good.splitlines()]
    out.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert f"{out}:1: not a row of this benchmark harness (missing run)" in _usage_error(capsys, report)
    out.write_text(good)
    capsys.readouterr()
    assert cli.main(report) == 0 and f"rows read from {out}" in capsys.readouterr().out


def test_append_after_a_cut_line_keeps_the_new_rows_whole(tmp_path):
    from benchmarks.harness import RowsError, append_rows, read_rows
    out = tmp_path / "rows.jsonl"
    out.write_text('{"op": "fake", "provi')  # the last line of a file whose disk filled up
    append_rows(out, [{"a": 1}, {"b": 2}])
    assert out.read_text().splitlines()[1:] == ['{"a": 1}', '{"b": 2}']
    with pytest.raises(RowsError, match=r"rows\.jsonl:1: not a JSON row"):
        read_rows(out)


def test_cli_ctrl_c_keeps_and_reports_the_rows_so_far(tmp_path, monkeypatch, capsys):
    made = _cli_fake(monkeypatch, interrupt_at="fastmlm-torch")
    try:
        code = cli.main(_cli_args(tmp_path))
    except KeyboardInterrupt:  # it used to escape as a traceback (and would stop pytest itself)
        pytest.fail("Ctrl-C escaped main()")
    assert code == 130
    assert made == ["reference", "fastmlm-torch"]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"reference"}
    assert "| reference |" in (tmp_path / "summary.md").read_text()
    assert "interrupted: the 1 rows measured so far are kept in" in capsys.readouterr().out


def test_plot_cli_names_a_bad_line_and_prefixes_as_the_suite_does(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = tmp_path / "run.jsonl"
    params = {"layout": "full", "heads": 2, "head_dim": 16, "pass": "fwd", "seqlen": 64}
    row = {**_rows("attention", "fastmlm-torch", "s=64", "TFLOP/s", 1.0, params), "device": "cpu", "torch": "x",
           "triton": "x", "cuda": "none", "commit": "c", "date": "d"}
    rows.write_text(json.dumps(row) + "\nnot json\n")
    with pytest.raises(SystemExit) as exc:
        plot.main([str(rows), "--out", str(tmp_path)])
    assert exc.value.code == 2 and f"{rows}:2: not a JSON row" in capsys.readouterr().err
    rows.write_text(json.dumps(row) + "\n")
    assert plot.main([str(rows), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "run-attention-tflops.png").exists()  # was "run.jsonlattention-tflops.png"


def test_headline_names_a_provider_whose_memory_measurement_failed():
    rows = [_rows("attention", "reference", "s=512", "time", 8.0),
            _rows("attention", "fastmlm-torch", "s=512", "time", 1.0),
            _rows("attention", "fastmlm-torch", "s=512", "peak memory", None, status="error",
                  note="RuntimeError: memory worker failed")]
    line = tables.headline(rows).splitlines()[-1]
    assert line.endswith("| fastmlm-torch (peak memory error) |"), line


@pytest.mark.parametrize("flag", [["--ops", "masked_ce"], ["--budget-s", "5"], ["--cpu-time-s", "1"],
                                  ["--threads", "1"], ["--no-memory"]])
def test_cli_report_only_refuses_measuring_flags_it_would_ignore(tmp_path, capsys, flag):
    out = tmp_path / "rows.jsonl"
    line = _usage_error(capsys, ["--report-only", "--cpu", "--plots", "none", "--out", str(out), *flag])
    assert f"argument --report-only: measures nothing, so {flag[0]} would be ignored" in line


def test_cli_will_not_append_to_a_file_it_could_not_read_back(tmp_path, monkeypatch, capsys):
    made = _cli_fake(monkeypatch)
    out = tmp_path / "rows.jsonl"
    out.write_text('{"op": "attention", "median": 1.0}\n')  # an older harness's row: no run, no device, ...
    line = _usage_error(capsys, _cli_args(tmp_path))
    assert f"argument --out: {out}:1: not a row of this benchmark harness" in line
    assert not made and out.read_text() == '{"op": "attention", "median": 1.0}\n'


def test_cli_summary_may_not_overwrite_the_rows_file(tmp_path, monkeypatch, capsys):
    made = _cli_fake(monkeypatch)
    out = tmp_path / "rows.jsonl"
    assert cli.main(_cli_args(tmp_path)) == 0
    before = out.read_text()
    line = _usage_error(capsys, _cli_args(tmp_path, "--summary", str(out)))
    assert "argument --summary: " in line and "would replace the rows" in line
    assert out.read_text() == before and len(made) == 2


def test_cli_plots_are_named_after_their_results_file(tmp_path, monkeypatch):
    """Two results files in one folder (smoke-rows.jsonl, full-rows.jsonl) each keep their plots: they were
    both named cpu-*.png, the second run's replacing the first's."""
    pytest.importorskip("matplotlib")
    _cli_fake(monkeypatch)
    shape = {"layout": "full", "heads": 2, "head_dim": 16, "pass": "fwd", "seqlen": 64}
    monkeypatch.setattr(sys.modules["benchmarks.fake_bench"], "OP", "attention")
    monkeypatch.setattr(sys.modules["benchmarks.fake_bench"], "shapes", lambda preset: [dict(shape)])
    monkeypatch.setattr(sys.modules["benchmarks.fake_bench"], "make",
                        lambda *a: Workload(step=lambda: None, check=lambda: "ok", flops=1e3))
    for name in ("smoke-rows.jsonl", "full-rows.jsonl"):
        args = _cli_args(tmp_path, "--out", str(tmp_path / name), "--plots", str(tmp_path))
        assert cli.main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["full-attention-tflops.png", "smoke-attention-tflops.png"]


@pytest.mark.parametrize("preset", ["gpu", "gpu-check"], ids=lambda p: f"preset={p}")  # not the gpu marker
def test_cli_refuses_a_gpu_preset_on_the_cpu(tmp_path, monkeypatch, capsys, preset):
    """Without a GPU, --preset gpu silently ran the GPU shapes (bf16, 8k tokens) on the CPU for hours."""
    made = _cli_fake(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [a for a in _cli_args(tmp_path, "--preset", preset) if a != "--cpu"]
    line = _usage_error(capsys, args)
    assert f"argument --preset: {preset} is sized for a GPU" in line and "no CUDA GPU" in line and not made


def test_two_runs_started_in_one_second_get_their_own_run_ids():
    assert Settings().run_id != Settings().run_id  # (they were the start second alone)


def test_cli_report_only_titles_the_summary_with_the_runs_preset(tmp_path, monkeypatch):
    _cli_fake(monkeypatch)
    assert cli.main(_cli_args(tmp_path)) == 0  # --preset smoke
    assert cli.main(["--report-only", "--cpu", "--plots", "none", "--out", str(tmp_path / "rows.jsonl")]) == 0
    assert (tmp_path / "summary.md").read_text().splitlines()[0] == "# Benchmarks: cpu, preset smoke"  # was "cpu"
