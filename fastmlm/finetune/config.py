"""FinetuneConfig: every setting of a fine-tuning run (``fastmlm finetune`` flags), validated."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

from ..config import from_fields

# May change when a run is resumed. A new ``epochs`` also stretches the schedule's decay to the new
# total, as ``train --max-steps`` does; ``stop_after`` pauses a run without touching its schedule.
RESUMABLE = ("epochs", "stop_after", "patience", "progress", "device")
CONFIG_FILE = "finetune_config.json"  # in the run folder: the settings the run's last session ran with


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class FinetuneConfig:
    """See ``fastmlm finetune --help`` for each field (fastmlm/finetune/cli.py)."""

    task: str = "docs-section"
    init: str = ""  # the run, checkpoint or Hugging Face folder to start from (--from)
    out_dir: str = "runs/finetune"
    valid: Optional[str] = None
    epochs: int = 3
    stop_after: Optional[int] = None  # stop (resumably) after this many epochs; the schedule is still epochs'
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps spent warming up, then linear decay to 0
    schedule: str = "linear"
    max_len: int = 128
    patience: int = 2
    classifier_dropout: Optional[float] = None
    clip_norm: float = 1.0
    max_train_examples: Optional[int] = None
    seed: int = 0
    log_every: int = 20
    precision: str = "auto"
    device: str = "auto"
    progress: bool = True
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    min_lr_ratio: float = 0.0

    def validate(self) -> "FinetuneConfig":
        def need(ok, msg):
            if not ok:
                raise ValueError(f"FinetuneConfig: {msg}")

        need(isinstance(self.init, str) and self.init, "init (--from) must name a run, checkpoint or Hugging Face "
             f"folder, got {self.init!r}")
        # Path("") is the current folder: an empty --out-dir (an unset shell variable) would put the run there
        need(isinstance(self.out_dir, str) and self.out_dir.strip(),
             f"out_dir (--out-dir) must name the run folder, got {self.out_dir!r}")
        for name in ("epochs", "batch_size", "log_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} (--{name.replace('_', '-')}) must be a positive "
                                                        f"integer, got {value!r}")
        need(self.stop_after is None or (isinstance(self.stop_after, int) and self.stop_after >= 1),
             f"stop_after (--stop-after) must be a positive integer or None, got {self.stop_after!r}")
        need(isinstance(self.patience, int) and self.patience >= 1,
             f"patience (--patience) must be >= 1, got {self.patience!r}")
        need(isinstance(self.max_len, int) and 3 <= self.max_len,
             f"max_len (--max-len) must be an integer >= 3 ([CLS], a token, [SEP]), got {self.max_len!r}")
        need(self.max_train_examples is None or (isinstance(self.max_train_examples, int) and
                                                 self.max_train_examples >= 2),
             f"max_train_examples (--max-train-examples) must be >= 2 or None, got {self.max_train_examples!r}")
        # the shuffles are numpy's default_rng(seed + 1000 * epoch) and torch.manual_seed(seed): both need
        # a non-negative seed, torch one below 2**64 (else "expected non-negative integer" after the baselines)
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2 ** 64,
             f"seed (--seed) must be an integer in [0, 2**64), got {self.seed!r}")
        need(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, f"lr (--lr) must be in (0, 1), got {self.lr!r}")
        need(_number(self.warmup) and 0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        # an infinite decay drives every weight to -inf in one step: a NaN loss blamed on the learning rate
        need(_number(self.weight_decay) and 0 <= self.weight_decay < math.inf,
             f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        # clip_grad_norm_ scales the gradients by clip_norm / norm: 0 would stop learning, a negative one reverse it
        need(isinstance(self.clip_norm, (int, float)) and self.clip_norm > 0,
             f"clip_norm (--clip-norm) must be a number > 0, got {self.clip_norm!r}")
        need(self.schedule in ("linear", "cosine"), f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        need(self.precision in ("auto", "fp32", "bf16", "fp16"),
             f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        need(self.classifier_dropout is None or (_number(self.classifier_dropout) and 0 <= self.classifier_dropout < 1),
             f"classifier_dropout must be in [0, 1) or None, got {self.classifier_dropout!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        """Inverse of :meth:`to_dict`; unknown keys are a ValueError (the result is not validated yet)."""
        return from_fields(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
