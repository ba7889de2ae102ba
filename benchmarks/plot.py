"""PNG plots from a benchmark results file (JSONL rows written by benchmarks/harness.py).

    python benchmarks/plot.py benchmarks/results/cpu-rows.jsonl --out benchmarks/results [--all-runs]

Draws, from the newest run in the file (or every run with --all-runs):
  <prefix>attention-tflops.png       attention TFLOP/s against sequence length, one panel per
                                     layout / heads / pass / dtype, one line per provider
  <prefix>masked_ce-memory.png       masked-LM loss peak memory against masked tokens
  <prefix>block_sparse-time.png      block-sparse time against kept density per sequence length,
                                     beside the ideal line (fastest dense baseline x density)
Needs matplotlib (pip install -e ".[bench]").
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path


class MissingMatplotlib(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib("matplotlib is not installed; install the bench extra: "
                                "pip install -e \".[bench]\" (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _ok(rows, op, metric):
    return [r for r in rows if r["op"] == op and r["metric"] == metric and r["status"] == "ok"
            and r["median"] is not None and isinstance(r.get("params"), dict)]


def _panels(plt, groups: dict, title: str):
    n = len(groups)
    cols = min(3, n)
    rows_n = -(-n // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    return fig, list(axes.flat[:n])


def _line(ax, points, name, **style):
    points = sorted(points)
    xs, med = [p[0] for p in points], [p[1] for p in points]
    lo = [p[1] - p[2] for p in points]
    hi = [p[3] - p[1] for p in points]
    ax.errorbar(xs, med, yerr=[[max(0, v) for v in lo], [max(0, v) for v in hi]], marker="o", ms=3, capsize=2,
                label=name, **style)


def _grouped(rows, op, metric, panel_of, x_of) -> dict:
    """{panel title: {provider: [(x, median, p20, p80), ...]}} of the ok rows of one op and metric."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in _ok(rows, op, metric):
        p = r["params"]
        groups[panel_of(r, p)][r["provider"]].append((x_of(r, p), r["median"], r["p20"], r["p80"]))
    return groups


def _draw(plt, groups: dict, path: Path, title: str, xlabel: str, ylabel: str, decorate=None) -> bool:
    """One panel per group, one line per provider (dense baselines dashed); False when nothing to draw."""
    if not groups:
        return False
    fig, axes = _panels(plt, groups, title)
    for ax, (panel, lines) in zip(axes, groups.items()):
        for name, points in sorted(lines.items()):
            _line(ax, points, name, linestyle="--" if name.startswith("dense-") else "-")
        if decorate is not None:
            decorate(ax, lines)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_attention(plt, rows, path: Path) -> bool:
    groups = _grouped(rows, "attention", "TFLOP/s",
                      lambda r, p: f"{p['layout']}, h={p['heads']}, d={p['head_dim']}, {p['pass']}, {r['dtype']}",
                      lambda r, p: p["seqlen"])
    return _draw(plt, groups, path, "attention: TFLOP/s (useful FLOPs) vs sequence length", "sequence length",
                 "TFLOP/s", lambda ax, lines: ax.set_xscale("log", base=2))


def plot_masked_ce(plt, rows, path: Path) -> bool:
    groups = _grouped(rows, "masked_lm_loss", "peak memory",
                      lambda r, p: f"H={p['hidden']}, V={p['vocab']}, {p['rate']:.0%} masked, {r['dtype']}",
                      lambda r, p: round(p["tokens"] * p["rate"]))
    return _draw(plt, groups, path, "masked-LM loss forward+backward: peak memory vs masked tokens",
                 "masked tokens (≈ tokens x rate)", "peak MiB above inputs", lambda ax, lines: ax.set_yscale("log"))


def _kept_density(label: str) -> float:
    return float(label.rsplit("density=", 1)[1])


def _ideal_line(ax, lines):
    """The fastest dense baseline scaled by the kept density: what a perfectly sparse kernel would take."""
    dense = [min(v for _, v, _, _ in pts) for n, pts in lines.items() if n.startswith("dense-")]
    if dense:
        xs = sorted({x for pts in lines.values() for x, *_ in pts})
        ax.plot(xs, [min(dense) * x for x in xs], color="black", linewidth=1, label="ideal: dense x density")


def plot_block_sparse(plt, rows, path: Path) -> bool:
    groups = _grouped(rows, "block_sparse_attention", "time",
                      lambda r, p: f"s={p['seqlen']}, h={p['heads']}, d={p['head_dim']}, block={p['block']}, "
                                   f"{r['dtype']}",
                      lambda r, p: _kept_density(r["shape"]))
    return _draw(plt, groups, path, "block-sparse attention forward+backward: time vs kept density",
                 "kept fraction of tiles", "ms", _ideal_line)


def plot_rows(rows: list[dict], folder: Path, prefix: str = "") -> list[Path]:
    """Draw every plot the rows allow; return the files written."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name, draw in (("attention-tflops", plot_attention), ("masked_ce-memory", plot_masked_ce),
                       ("block_sparse-time", plot_block_sparse)):
        path = folder / f"{prefix}{name}.png"
        if draw(plt, rows, path):
            made.append(path)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="PNG plots from a benchmark results file")
    p.add_argument("results", type=Path, help="JSONL rows (benchmarks/results/*-rows.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: beside the results)")
    p.add_argument("--prefix", default=None, help="file name prefix (default: the results file's name stem)")
    p.add_argument("--all-runs", action="store_true", help="plot every run in the file, not only the newest")
    args = p.parse_args(argv)
    if __package__ in (None, ""):  # run as benchmarks/plot.py: make the benchmarks package importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.harness import RowsError, latest_run, read_rows  # names a corrupt or older line

    if not args.results.is_file():
        p.error(f"argument results: no results file {args.results}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        p.error(f"argument --out: {args.out} is a file; expected a folder")
    try:
        rows = read_rows(args.results)
    except RowsError as exc:
        p.error(f"argument results: {exc}")
    if not args.all_runs:
        rows = latest_run(rows)
    # As python -m benchmarks names them: "cpu-rows.jsonl" -> "cpu-", any other name its stem and a dash
    name = args.results.name
    stem = name[: -len("rows.jsonl")] if name.endswith("rows.jsonl") else args.results.stem + "-"
    prefix = args.prefix if args.prefix is not None else stem
    try:
        made = plot_rows(rows, args.out or args.results.parent, prefix)
    except MissingMatplotlib as exc:
        print(f"plot.py: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(m) for m in made) or "no plottable rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
