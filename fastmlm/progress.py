"""How a training run reports as it goes: its running totals (:class:`Meter`) and its console output
(:class:`Progress`: a bar on a terminal, plain lines when the output is redirected).

The run's files (log.csv, curves.png) are fastmlm.run_dir's and fastmlm.plot's.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Optional

import torch

from .distributed import Dist


# --------------------------------------------------------------------------- running totals
class Meter:
    """The loop's running totals between log rows: the loss stays on the device (summed, with the
    first step whose loss was NaN/inf), so a step reads nothing back; token counts are host integers."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # since the last log, this rank
        self.first_bad = torch.full((), torch.iinfo(torch.int64).max, device=device)  # first step with a NaN/inf loss
        self.masked, self.tokens = 0, 0  # since the last log, this rank
        self.run_tokens = 0  # the whole run, all ranks
        self.last_loss = float("nan")
        self.run_start = self.start = time.perf_counter()

    def add(self, step: int, step_loss: torch.Tensor, micro) -> None:
        """Count optimizer step ``step``: its summed loss (on the device) and its micro-batches."""
        self.masked += sum(b.n_masked for b in micro)
        self.tokens += sum(b.n_tokens for b in micro)
        self.loss_sum += step_loss
        self.first_bad = torch.where(step_loss.isfinite(), self.first_bad, self.first_bad.clamp(max=step))  # no sync

    def interval(self, ranks: Dist) -> tuple[Optional[float], float]:
        """(loss, tokens/s) since the last log row, over all ranks; the loss is NaN/inf when any step's was,
        and None when no token was masked in the interval (a tiny corpus at a low mask rate): no loss was
        measured, which is not a loss of 0.

        The one host sync of a log interval. Resets the sums (:meth:`restart_clock` resets the clock).
        """
        totals = ranks.all_sum(torch.stack([self.loss_sum, torch.tensor(float(self.masked), dtype=torch.float64,
                                                                         device=self.loss_sum.device)]))
        loss_total, masked_total = totals.tolist()  # host sync once per log interval
        if not math.isfinite(loss_total):  # NaN/inf on some rank: all ranks see it in the sum and stop
            return loss_total, 0.0
        loss = loss_total / masked_total if masked_total else None
        self.last_loss = self.last_loss if loss is None else loss
        tokens_per_s = self.tokens * ranks.world_size / max(time.perf_counter() - self.start, 1e-9)
        self.run_tokens += self.tokens * ranks.world_size
        self.loss_sum.zero_()
        self.masked, self.tokens = 0, 0
        return loss, tokens_per_s

    def restart_clock(self) -> None:
        """Start timing the next interval (after a log row)."""
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Leave what runs inside (a validation, a picture, a save) out of the interval's training time."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def elapsed(self) -> float:
        """Seconds since the loop started."""
        return time.perf_counter() - self.run_start


# --------------------------------------------------------------------------- progress on the console
def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """How a run reports on the console (main rank): a tqdm bar on a terminal, plain lines otherwise.

    ``mode``: ``"bar"`` when both stdout and stderr are terminals (the bar draws on stderr);
    ``"lines"`` when either is redirected (a log file, a pipe, a CI job): one line per log
    step, ``step 200/1000 (20%) | loss 5.123 | lr 1.0e-03 | 7,812 tokens/s | 0:00:26 elapsed,
    ETA 0:01:44``, without carriage returns; ``"off"`` with ``--no-progress`` (validations and
    the summary are still printed). The rate and ETA count only steps this process took since
    :meth:`start` (a resumed run starts it after its data skip), so they are honest from the first step.
    """

    def __init__(self, total: int, initial: int, enabled: bool, mode: Optional[str] = None):
        if mode is None:
            mode = ("bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines") if enabled else "off"
        self.mode, self.total, self.initial, self.step = mode, total, initial, initial
        self.bar = None
        self.start()

    def start(self) -> None:
        """Start (or restart) the clock of the rate and ETA, and the bar."""
        self.began, self.begin_step = time.perf_counter(), self.step
        if self.mode == "bar" and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def log(self, loss: Optional[float], lr: float, tokens_per_s: float) -> None:
        """The log step's figures: on the bar, or one plain line (loss None: no token was masked, shown as "-")."""
        shown = "-" if loss is None else f"{loss:.3f}"
        if self.bar is not None:
            self.bar.set_postfix(loss=shown, tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.1e}")
        elif self.mode == "lines":
            elapsed = time.perf_counter() - self.began
            done = self.step - self.begin_step
            eta = elapsed / done * (self.total - self.step) if done else float("nan")
            print(f"step {self.step}/{self.total} ({self.step / self.total:.0%}) | loss {shown} | lr {lr:.1e} | "
                  f"{tokens_per_s:,.0f} tokens/s | {_clock(elapsed)} elapsed, ETA "
                  f"{_clock(eta) if eta == eta else '?'}", flush=True)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
