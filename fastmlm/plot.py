"""Training curves: every run's ``curves.png``, and several runs overlaid (``fastmlm plot``).

    <run>/log.csv ──read_log──► train / valid rows ──plot_runs──► one PNG of four panels by step:
        loss (train, and validation dashed)    validation masked-token accuracy
        validation perplexity (log scale)      learning rate

The training loop calls :func:`write_curves` after each validation and at the end, so
``<run>/curves.png`` always shows the run so far. ``fastmlm plot RUN [RUN ...] --out FILE``
overlays runs, one colour each. Drawing uses matplotlib's Agg canvas directly (no pyplot,
so no global backend is switched in the caller's process), imported only when a picture is
drawn. Without matplotlib a run trains as before and says once, with a :class:`PlotWarning`,
that it draws no curves.
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

CURVES = "curves.png"
_LOG_COLUMNS = ("step", "split", "loss", "accuracy", "perplexity", "lr")  # of log.csv (fastmlm.run_dir.Logger)


class PlotWarning(UserWarning):
    """curves.png could not be drawn (matplotlib missing, or an unreadable log); training goes on."""


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_log(run) -> dict[str, dict[str, list[float]]]:
    """``{"train": {"step": [...], "loss": [...], "lr": [...]}, "valid": {"step", "loss", "accuracy",
    "perplexity"}}`` from a run folder's log.csv (or a log.csv path); FileNotFoundError without one,
    ValueError for a file that is not such a log."""
    path = Path(run)
    if path.is_dir():
        path = path / "log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path} (a run folder holds log.csv)")
    columns = {"train": ("step", "loss", "lr"), "valid": ("step", "loss", "accuracy", "perplexity")}
    out = {split: {name: [] for name in names} for split, names in columns.items()}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"step", "split"} <= set(reader.fieldnames or ()):  # else drawn as an empty picture
                found = f"its columns are {reader.fieldnames}" if reader.fieldnames else "it is empty"
                raise ValueError(f"{path} is not a fastmlm training log: {found}, expected the columns "
                                 f"{', '.join(_LOG_COLUMNS)}")
            for row in reader:
                split = row.get("split")
                if split in out:
                    for name in columns[split]:
                        out[split][name].append(_number(row.get(name)))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a fastmlm training log: it is not UTF-8 text") from None
    return out


def _label(runs: Sequence[Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [p.name if p.name != "log.csv" else p.parent.name for p in runs]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, runs)]


def plot_runs(runs: Sequence, out, title: Optional[str] = None) -> Path:
    """Draw the curves of ``runs`` (run folders or log.csv files) into the PNG ``out``, overlaid.

    Written atomically (a temporary file renamed), so a reader never sees half a picture.
    ImportError when matplotlib is missing; FileNotFoundError for a run without log.csv.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("plot_runs needs at least one run")
    logs = [read_log(r) for r in runs]
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    (loss_ax, acc_ax), (ppl_ax, lr_ax) = fig.subplots(2, 2, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for log, label, colour in zip(logs, _label(runs), colours):
        train, valid = log["train"], log["valid"]
        loss_ax.plot(train["step"], train["loss"], color=colour, lw=1.2, label=f"{label} train")
        if valid["step"]:
            loss_ax.plot(valid["step"], valid["loss"], color=colour, ls="--", marker="o", ms=3,
                         label=f"{label} validation")
            acc_ax.plot(valid["step"], [100 * a for a in valid["accuracy"]], color=colour, marker="o", ms=3,
                        label=label)
            ppl_ax.plot(valid["step"], valid["perplexity"], color=colour, marker="o", ms=3, label=label)
        lr_ax.plot(train["step"], train["lr"], color=colour, lw=1.2, label=label)
    loss_ax.set(title="masked-token loss (train; validation dashed)", ylabel="cross-entropy (nats)")
    acc_ax.set(title="validation masked-token accuracy", ylabel="%")
    ppl_ax.set(title="validation perplexity", ylabel="perplexity (log scale)", xlabel="step")
    lr_ax.set(title="learning rate", xlabel="step")
    if any(p > 0 for log in logs for p in log["valid"]["perplexity"] if math.isfinite(p)):
        ppl_ax.set_yscale("log")
    for ax in (loss_ax, acc_ax, ppl_ax, lr_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7 if len(runs) > 2 else 8)
        else:
            ax.text(0.5, 0.5, "no validation yet", transform=ax.transAxes, ha="center", va="center", color="0.5")
    fig.suptitle(title or ("training curves: " + ", ".join(_label(runs))), fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_curves(run_dir, title: Optional[str] = None) -> Optional[Path]:
    """(Re)draw ``<run_dir>/curves.png`` from its log.csv; the path, or None (with a
    :class:`PlotWarning`) when it cannot be drawn. Never raises: a picture must not stop a run."""
    try:
        return plot_runs([run_dir], Path(run_dir) / CURVES, title=title)
    except ImportError:
        warnings.warn("matplotlib is not installed, so no curves.png is drawn (pip install matplotlib; "
                      "fastmlm plot RUN draws it later from log.csv)", PlotWarning, stacklevel=2)
    except Exception as exc:  # an unreadable log, a full disk: say so and train on
        warnings.warn(f"could not draw {Path(run_dir) / CURVES}: {type(exc).__name__}: {exc}", PlotWarning,
                      stacklevel=2)
    return None
