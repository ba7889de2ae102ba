"""Training curves (fastmlm/plot.py): curves.png from a hand-written log.csv, runs overlaid, the `fastmlm plot`
command, and training that goes on without matplotlib."""
import re
import sys

import pytest

from fastmlm import cli, plot

PNG = b"\x89PNG\r\n\x1a\n"
HEADER = "step,split,loss,accuracy,perplexity,lr,tokens_per_s,packing_efficiency,elapsed_s\n"


def _write_log(run, rows):
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.csv").write_text(HEADER + "".join(rows))
    return run


def _run(tmp_path, name="a", scale=1.0):
    rows = [f"{s},train,{7 - s / 100 * scale},,,{1e-3 * min(1, s / 20)},5000,1.0,{s / 10}\n" for s in range(10, 110, 10)]
    rows.insert(5, f"50,valid,{6.5 - scale / 5},{0.08 * scale},{600 / scale},,,,5.0\n")
    rows.append(f"100,valid,{6.2 - scale / 5},{0.12 * scale},{450 / scale},,,,10.0\n")
    return _write_log(tmp_path / name, rows)


def test_read_log_splits_train_and_validation_rows(tmp_path):
    log = plot.read_log(_run(tmp_path))
    assert log["train"]["step"] == [float(s) for s in range(10, 110, 10)]
    assert log["valid"]["step"] == [50.0, 100.0] and log["valid"]["accuracy"] == [0.08, 0.12]
    assert log["train"]["lr"][-1] == pytest.approx(1e-3)
    with pytest.raises(FileNotFoundError, match="no training log"):
        plot.read_log(tmp_path / "missing")


def test_write_curves_draws_a_png_in_the_run_folder(tmp_path):
    pytest.importorskip("matplotlib")
    run = _run(tmp_path)
    out = plot.write_curves(run)
    assert out == run / "curves.png" and out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # a run with no validation yet still gets its picture
    early = _write_log(tmp_path / "early", ["10,train,7.0,,,0.001,5000,1.0,1.0\n"])
    assert plot.write_curves(early).read_bytes().startswith(PNG)


def test_fastmlm_plot_overlays_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b", scale=2.0)
    out = tmp_path / "both.png"
    assert cli.main(["plot", str(a), str(b / "log.csv"), "--out", str(out), "--title", "a against b"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and out.read_bytes().startswith(PNG)
    assert cli.main(["plot", str(a)]) == 0 and (a / "curves.png").exists()  # one run: its own curves.png
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2
    assert "fastmlm plot: error: no training log" in capsys.readouterr().err


def test_without_matplotlib_a_warning_not_a_crash(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    with pytest.warns(plot.PlotWarning, match="matplotlib is not installed"):
        assert plot.write_curves(run) is None
    assert not (run / "curves.png").exists()
    assert cli.main(["plot", str(run)]) == 2
    assert "drawing needs matplotlib" in capsys.readouterr().err


def test_an_unreadable_log_is_a_warning(tmp_path):
    pytest.importorskip("matplotlib")
    run = _write_log(tmp_path / "bad", [])
    (run / "log.csv").write_bytes(b"\xff\xfe not csv")
    with pytest.warns(plot.PlotWarning, match="could not draw"):
        assert plot.write_curves(run) is None


def test_fastmlm_plot_refuses_what_it_cannot_draw(tmp_path, capsys):
    """Each of these was drawn as an empty picture and reported "wrote ...", or ended in a traceback
    (--out a folder: IsADirectoryError; a binary log: a bare UnicodeDecodeError naming no file)."""
    pytest.importorskip("matplotlib")
    empty = _write_log(tmp_path / "empty", [])  # a run that has logged nothing yet
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.csv").write_text("a,b\n1,2\n")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "log.csv").write_bytes(b"\x00\xff\xfe garbage")
    (tmp_path / "file").write_text("x")
    good = _run(tmp_path)
    for args, message in [([str(empty)], "its log.csv has no rows yet"),
                          ([str(other)], r"other/log.csv is not a fastmlm training log: its columns are \['a', 'b'\]"),
                          ([str(binary)], "binary/log.csv is not a fastmlm training log: it is not UTF-8 text"),
                          ([str(tmp_path / "file")], r"file is not a fastmlm training log: its columns are \['x'\]"),
                          ([str(good), "--out", str(tmp_path)], f"--out {tmp_path} is a folder; expected the path"),
                          ([str(good), "--out", str(tmp_path / "file" / "x.png")], "which is a file")]:
        assert cli.main(["plot", *args]) == 2, args
        err = capsys.readouterr().err
        assert "fastmlm plot: error: " in err and "Traceback" not in err
        assert re.search(message, err), (args, err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
