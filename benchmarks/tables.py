"""Markdown tables from result rows: one per op with ratios, and a one-line-per-shape headline.

Providers fall in four kinds: the ``reference`` (fastmlm's oracle), ours
(``fastmlm...``), baselines (``dense-...``: fastmlm's dense kernel under a sparse
op) and peers (everything else: SDPA, FlexAttention, Hugging Face, Liger, CCE,
plain torch). Ratios are speed-ups (other time / this time; > 1 = this one is
faster) and memory savings (other peak / this peak; > 1 = this one uses less).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional


def kind(provider: str) -> str:
    if provider == "reference":
        return "reference"
    if provider.startswith("fastmlm"):
        return "ours"
    if provider.startswith("dense-"):
        return "baseline"
    return "peer"


def _group(rows: list[dict]) -> "OrderedDict[tuple, OrderedDict[str, dict]]":
    """(op, shape, dtype) -> provider -> {metric: row, "status": row}, in order of appearance."""
    groups: OrderedDict = OrderedDict()
    for row in rows:
        key = (row["op"], row["shape"], row["dtype"])
        cell = groups.setdefault(key, OrderedDict()).setdefault(row["provider"], {})
        if row["metric"] in ("status", "time"):  # the provider's outcome: a skip/failure, or its check note
            cell["status"] = row
        elif row["status"] != "ok":  # e.g. the memory measurement failed after a good timing
            cell.setdefault("problems", []).append(f"{row['metric']}: {row['note']}")
        if row["median"] is not None:
            cell[row["metric"]] = row
    return groups


def _value(cell: dict, metric: str) -> Optional[float]:
    row = cell.get(metric)
    return None if row is None else row["median"]


def _ratio(other: Optional[float], this: Optional[float]) -> str:
    if other is None or this is None or this <= 0 or other <= 0:
        return "—"
    return f"{other / this:.2f}x"


def _best(cells: dict, which: str, metric: str = "time") -> tuple[Optional[str], Optional[float]]:
    values = [(name, _value(c, metric)) for name, c in cells.items() if kind(name) == which]
    values = [(n, v) for n, v in values if v is not None and v > 0]
    return min(values, key=lambda nv: nv[1]) if values else (None, None)


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.3e}"


def op_tables(rows: list[dict]) -> str:
    """One markdown section per op, one table per (shape, dtype)."""
    out, current_op = [], None
    for (op, shape, dtype), cells in _group(rows).items():
        if op != current_op:
            out.append(f"\n### {op}\n")
            current_op = op
        ref_time, ref_mem = _value(cells.get("reference", {}), "time"), _value(cells.get("reference", {}), "peak memory")
        peer_name, peer_time = _best(cells, "peer")
        base_name, base_time = _best(cells, "baseline")
        rate_metric = next((m for c in cells.values() for m in ("TFLOP/s", "tokens/s") if m in c), None)
        head = ["provider", "time ms (p20–p80)", "vs reference", f"vs best peer ({peer_name or 'none'})"]
        if base_name:
            head.append(f"vs {base_name}")
        head += [rate_metric or "rate", "peak MiB", "memory vs reference", "check / status"]
        out.append(f"**{shape}**, {dtype}\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for name, cell in cells.items():
            status = cell["status"]
            if status["status"] != "ok":
                row = [name] + ["—"] * (len(head) - 2) + [f"{status['status']}: {status['note'][:100]}"]
            else:
                t = cell.get("time")
                mem = _value(cell, "peak memory")
                note = "; ".join(cell.get("problems", [])) or status.get("note") or "ok"
                time_txt = f"{t['median']:.3g} ({t['p20']:.3g}–{t['p80']:.3g})" if t else "—"
                row = [name, time_txt, _ratio(ref_time, _value(cell, "time")), _ratio(peer_time, _value(cell, "time"))]
                if base_name:
                    row.append(_ratio(base_time, _value(cell, "time")))
                row += [_fmt(_value(cell, rate_metric)) if rate_metric else "—", _fmt(mem),
                        _ratio(ref_mem, mem), note[:160]]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def headline(rows: list[dict]) -> str:
    """One line per (op, shape, dtype): fastmlm's fastest provider against the reference and the best peer."""
    lines = ["| op | shape | dtype | fastest fastmlm | ms | vs reference | best peer | vs best peer | "
             "peak MiB | memory vs reference | failed / error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (op, shape, dtype), cells in _group(rows).items():
        ours, ours_time = _best(cells, "ours")
        peer, peer_time = _best(cells, "peer")
        ref = cells.get("reference", {})
        bad = [f"{n} ({c['status']['status']})" for n, c in cells.items()
               if c["status"]["status"] in ("failed check", "error")]
        # A good timing whose memory measurement failed: say so here too, not just a bare "—" under peak MiB.
        bad += [f"{n} ({problem.split(':')[0]} error)" for n, c in cells.items() for problem in c.get("problems", [])]
        mem = _value(cells.get(ours, {}), "peak memory") if ours else None
        lines.append("| " + " | ".join([
            op, shape, dtype, ours or "none ran", _fmt(ours_time), _ratio(_value(ref, "time"), ours_time),
            peer or "none", _ratio(peer_time, ours_time), _fmt(mem), _ratio(_value(ref, "peak memory"), mem),
            ", ".join(bad) or "—"]) + " |")
    return "\n".join(lines)
