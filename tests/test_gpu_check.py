"""benchmarks/gpu_check.py --cpu-smoke, end to end in a subprocess: every step's code path that needs no
CUDA (the tests step's pytest run and parsing, the benchmark subprocesses per op), the report writer
and the plots, checked in the report it writes. About 50 s on two cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run even where a GPU exists: this tests the script, not the GPU
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(out),
                           "--budget-s", "240"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return out, done


def test_smoke_run_exits_0_and_prints_the_summary_last(smoke_run):
    out, done = smoke_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CPU smoke run (no GPU figures): passed" in done.stdout
    assert "| step | status | seconds | note |" in done.stdout


def test_the_report_has_every_step_and_says_it_is_a_smoke_run(smoke_run):
    out, _ = smoke_run
    reports = list(out.glob("*-report.md"))
    assert len(reports) == 1 and reports[0].name.endswith("-nogpu-report.md")
    text = reports[0].read_text()
    assert "**CPU smoke run**" in text and "no GPU figure comes from it" in text
    assert "| build | skipped |" in text and "no CUDA GPU" in text
    assert "| tests | passed |" in text and "CPU smoke selection, not the GPU tier" in text
    assert "| bench | passed |" in text
    assert "## GPU test tier" in text and "| tests/test_dispatch.py |" in text  # parsed from pytest -v
    assert "## Benchmarks (preset smoke)" in text
    for op in ("attention", "masked_lm_loss", "block_sparse_attention", "train_step"):
        assert f"| {op} |" in text, op
    for line in ("python ", "torch ", "git commit "):
        assert line in text
    assert len(list(out.iterdir())) <= 8  # flat and small


def test_rows_cover_every_op_and_skip_the_gpu_peers_with_their_reason(smoke_run):
    out, _ = smoke_run
    rows = [json.loads(line) for line in next(out.glob("*-rows.jsonl")).read_text().splitlines()]
    assert {r["op"] for r in rows} == {"attention", "masked_lm_loss", "block_sparse_attention", "train_step", "hf_patch"}
    assert not [r for r in rows if r["status"] in ("failed check", "error")]
    by = {(r["op"], r["provider"]): r for r in rows}
    assert by[("attention", "torch-varlen")]["status"] == "skipped"
    assert "runs on CUDA only" in by[("attention", "torch-varlen")]["note"]
    assert "runs on CUDA only" in by[("block_sparse_attention", "torch-varlen-window")]["note"]
    assert any(r["provider"] == "fastmlm-torch" and r["metric"] == "time" and r["status"] == "ok" for r in rows)


def test_plots_and_logs_are_written(smoke_run):
    out, _ = smoke_run
    plots = sorted(p.name.split("-nogpu-")[1] for p in out.glob("*.png"))
    assert "attention-tflops.png" in plots and "block_sparse-time.png" in plots
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.glob("*.png"))
    assert next(out.glob("*-pytest.log")).read_text().count("PASSED") >= 3
    assert "benchmarks" in next(out.glob("*-bench.log")).read_text()


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel: one module that says its version, and its dist-info."""
    import zipfile
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}.py", f"VERSION = {version!r}\n")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def test_peer_wheels_install_into_a_folder_the_benchmark_processes_see(tmp_path, monkeypatch):
    """gpu_check's first act on a registry-less machine: the carried wheels go into a folder outside the repo,
    first on sys.path and on PYTHONPATH, so the benchmark subprocesses import them."""
    from benchmarks import peer_wheels
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    src, target = tmp_path / "whl", tmp_path / "site"
    assert "no wheels in" in peer_wheels.install(src, target)  # absent folder: a note, nothing installed
    src.mkdir()
    _wheel(src, "fastmlm_peer_probe", "1.2.3")
    note = peer_wheels.install(src, target)
    assert note.startswith("installed fastmlm_peer_probe-1.2.3-py3-none-any.whl"), note
    assert sys.path[0] == str(target) and os.environ["PYTHONPATH"] == f"{target}{os.pathsep}/somewhere"
    child = subprocess.run([sys.executable, "-c", "import fastmlm_peer_probe as p; print(p.VERSION)"],
                           capture_output=True, text=True, env=dict(os.environ))
    assert child.stdout.strip() == "1.2.3", child.stderr
    (src / "broken-0-py3-none-any.whl").write_bytes(b"not a zip")
    assert "failed" in peer_wheels.install(src, tmp_path / "site2")


def test_bench_step_fails_on_our_rows_not_on_a_peer_failing_its_check(tmp_path, monkeypatch):
    """CCE at its defaults may fail the error-ratio rule: that is listed, not a failed step; a failed check of
    ours, or any provider's error (a peer's: most likely our adapter), fails the step."""
    import argparse
    from benchmarks import gpu_check
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text("")
    monkeypatch.setattr(gpu_check, "run_logged", lambda *a, **k: (0, ""))

    def outcome(*statuses):
        rows = [{"provider": p, "status": s} for p, s in statuses]
        monkeypatch.setattr(gpu_check, "read_rows", lambda path: rows)
        step, _ = gpu_check.step_bench(False, rows_path, tmp_path / "log", 100.0, argparse.Namespace(cpu_smoke=True))
        return step.status, step.note

    status, note = outcome(("fastmlm-triton", "ok"), ("cce", "failed check"))
    assert status == "passed" and "peers failing the check (not timed): cce" in note
    assert outcome(("fastmlm-triton", "failed check"), ("cce", "ok"))[0] == "failed"
    assert outcome(("fastmlm-triton", "ok"), ("liger", "error"))[0] == "failed"


def test_a_line_cut_by_a_stopped_op_is_dropped_so_the_next_op_can_append(tmp_path, monkeypatch):
    """An op's process stopped at its limit mid-write leaves a cut line; the benchmark CLI refuses to append
    after one, so every later op of the GPU run would exit 2. gpu_check drops such lines after each op."""
    import argparse
    from benchmarks import gpu_check
    from benchmarks.harness import ROW_FIELDS
    good = json.dumps({k: "x" for k in ROW_FIELDS} | {"provider": "fastmlm-torch", "status": "ok"})
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text(good + "\n" + good[:40])  # the second row cut short
    monkeypatch.setattr(gpu_check, "run_logged", lambda *a, **k: (0, ""))
    step, rows = gpu_check.step_bench(False, rows_path, tmp_path / "log", 100.0, argparse.Namespace(cpu_smoke=True))
    assert rows_path.read_text() == good + "\n" and len(rows) == 1
    assert step.status == "failed" and "1 unreadable line(s) of rows.jsonl dropped" in step.note
    assert gpu_check.drop_unreadable_lines(rows_path) == 0 and gpu_check.drop_unreadable_lines(tmp_path / "no") == 0


def test_peer_wheels_download_says_which_wheel_failed(tmp_path, monkeypatch):
    """`make gpu-wheels` without a registry: one line naming the wheel, not a CalledProcessError traceback."""
    from benchmarks import peer_wheels
    monkeypatch.setattr(peer_wheels.importlib.metadata, "version", lambda name: "9.9.9")
    monkeypatch.setattr(peer_wheels.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(SystemExit, match=r"pip could not download liger-kernel==9\.9\.9 into .*this needs a "
                                         r"package registry"):
        peer_wheels.download(tmp_path / "whl")
