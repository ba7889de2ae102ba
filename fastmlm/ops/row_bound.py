"""The static row bound of masked_lm_loss without ``positions`` (a leaf: imports no fastmlm module,
so ``kernels/`` may use it).

Where the counted rows cannot be compacted on the host (CUDA: it would cost a synchronisation),
the fast backends project a static B = min(R, ceil(f * R) + SLACK_ROWS) rows for a call of R rows
at ``max_masked_fraction`` f, and assert on the device that no more rows count. fastmlm.hf.patch
sizes its gathered rows by the same rule.
"""
from __future__ import annotations

import math

SLACK_ROWS = 64  # rows added to the bound: room for the spread of small batches' masked counts


def counted_bound(rows: int, fraction: float) -> int:
    """B, the most rows that may count of ``rows`` at ``max_masked_fraction`` = ``fraction`` (1.0: all)."""
    if fraction >= 1.0:
        return rows
    return min(rows, math.ceil(fraction * rows) + SLACK_ROWS)


def bound_message(bound: int, rows: int, fraction: float) -> str:
    """The error of a call with more than ``bound`` counted rows: the bound and the two ways past it."""
    return (f"more rows count (labels != ignore_index) than the {bound} of {rows} rows allowed without "
            f"positions (max_masked_fraction={fraction}: ceil(f * rows) + {SLACK_ROWS}); pass "
            "positions (a static list of the masked tokens, -1 padded) or a larger max_masked_fraction (1.0: no bound)")
