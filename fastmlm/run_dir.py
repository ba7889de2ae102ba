"""The run folder ``<run>/``: one training process at a time, a fresh or a resumed start, its log.

    <run>/.lock               held by the training process (:class:`RunLock`)
    <run>/train_config.json   the run's TrainConfig
    <run>/tokenizer.json      the tokenizer a fresh run trained
    <run>/log.csv             one row per log step and validation (:class:`Logger`; TensorBoard beside it)
    <run>/curves.png          loss, accuracy, perplexity and lr by step, redrawn at each validation (fastmlm.plot)
    <run>/summary.json        written when the run ends
    <run>/checkpoints/        the checkpoints (fastmlm.checkpoint)

:class:`RunLock` holds ``<run>/.lock`` while a run trains, and under that lock the
temporaries of saves a killed run left behind are removed (:func:`remove_stale_temporaries`;
:func:`locked` does both). A fresh run clears what an earlier one left (:func:`start_fresh`);
a resumed one reopens its newest checkpoint (:func:`open_resumed`), and its log drops the
rows a killed run wrote after that checkpoint. What the run shows on the console meanwhile is
fastmlm.progress's.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from .config import TrainConfig, resumed_config
from .corpus_reader import HeldOut, read_documents
from .distributed import Dist
from .tokenizer import load_tokenizer, train_tokenizer


# --------------------------------------------------------------------------- the lock
LOCK = ".lock"
# The temporaries of fastmlm.checkpoint: ".step_00000100.tmp<pid>", ".step_00000100.old<pid>", ".latest.tmp<pid>", ...
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)\d+$")


class RunLockedError(ValueError):
    """The run folder is in use by another live training process."""


class RunLock:
    """An exclusive lock on a run folder, so that two training processes never write into one.

    ``fcntl.flock`` on ``<run>/.lock``, which holds the owner's pid for the message others
    get. The kernel drops a flock when its process dies, even by kill -9, so the folder of
    a dead run is simply taken over; nothing has to be cleaned up. The file is left in
    place on release: unlinking it could let two later processes lock two different files.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl  # POSIX; imported here so that reading checkpoints works without it

        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"--out-dir {self.run_dir} is a file; expected a run folder (new or existing)")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file on the way there, no permission: named, not a traceback
            raise ValueError(f"--out-dir {self.run_dir}: cannot make the run folder ({exc.strerror}: "
                             f"{exc.filename})") from None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.run_dir} is in use by another fastmlm run (pid {owner}, lock file "
                                 f"{self.path}); wait for it to finish or stop it, or pick another --out-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(run_dir) -> list[Path]:
    """Remove what killed saves left in ``run_dir`` and its ``checkpoints/`` (``.step_N.tmpPID`` ...).

    Call it only while holding the run's :class:`RunLock`: then no other process is
    writing there, so every temporary is a dead process's leftover (or a failed save of
    this one). Returns the removed paths.
    """
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if _TEMPORARY.match(path.name):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def locked(run_dir, main: bool = True):
    """Hold the run folder's :class:`RunLock` (on the main rank) and remove stale temporaries under it.

    Arguments:
        run_dir: the run folder (created if needed).
        main: whether this process is the main rank; the others neither lock nor clean.
    Raises:
        RunLockedError when another live process holds the lock.
    """
    lock = RunLock(run_dir).acquire() if main else None
    try:
        if lock is not None:
            remove_stale_temporaries(run_dir)  # no other process writes here while we hold the lock
        yield
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------- fresh or resumed start
def open_resumed(cfg: TrainConfig, resume: str, changes: Optional[dict]):
    """(run config, checkpoint folder, trainer state) of the run to resume (see :func:`resumed_config`)."""
    resume_from = None if resume == "latest" else Path(resume)
    saved, resume_from, state = saved_run(cfg.out_dir, TrainConfig, resume_from)
    return resumed_config(saved, cfg, changes), resume_from, state


def saved_run(out_dir, config_class, checkpoint: Optional[Path] = None, flag: str = "--resume"):
    """(the run's saved config as ``config_class``, checkpoint folder, trainer state) of
    ``checkpoint``, by default the latest under ``out_dir``/checkpoints."""
    root = Path(out_dir) / "checkpoints"
    latest = checkpoint is None
    checkpoint = ckpt.latest_checkpoint(root) if latest else checkpoint
    if checkpoint is None:
        raise ckpt.CheckpointError(f"{flag}: no checkpoint under {root}")
    try:
        state = ckpt.load_trainer_state(checkpoint)
    except ckpt.CheckpointError as exc:  # a damaged latest checkpoint: say which earlier one the run can go on from
        earlier = [p for p in ckpt.list_checkpoints(root) if p.name < checkpoint.name] if latest else []
        if not earlier:
            raise
        raise ckpt.CheckpointError(f"{exc}; the run's previous checkpoint is {earlier[-1]}: continue from it with "
                                   f"{flag} {earlier[-1]}") from None
    return config_class.from_dict(json.loads(state["train_config"])), checkpoint, state


def nothing_to_do(cfg: TrainConfig, step: int, resume_from: Path, ranks: Dist) -> dict:
    """A resumed run already at its last step: say so, touch nothing, return the run's summary."""
    out_dir = Path(cfg.out_dir)
    if step >= cfg.max_steps:
        msg = f"the run in {out_dir} is finished (step {step} of max_steps {cfg.max_steps}); nothing to do: " \
              f"raise --max-steps to extend it"
    else:
        msg = f"the run in {out_dir} is at step {step}, at or past --stop-after {cfg.stop_after}; nothing to do"
    if ranks.main:
        print(f"fastmlm train: {msg}")
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):  # killed between its last checkpoint and the summary
        summary = {"step": step, "checkpoint": str(resume_from)}
    return {**summary, "rank": ranks.rank, "nothing_to_do": msg}


RUN_LOGS = ("log.csv", "summary.json", "tensorboard", "curves.png")  # what every run writes beside its checkpoints


def refuse_existing_run(out_dir: Path, overwrite: bool, config_name: str = "train_config.json",
                        logs: tuple = RUN_LOGS) -> bool:
    """Whether ``out_dir`` holds a run (checkpoints); ValueError when it does and ``overwrite`` is off,
    and when a folder that no run made (no checkpoints, no ``config_name``) holds files named as the
    run's ``logs``: those are the user's, and a fresh run would clear or append to them."""
    out_dir = Path(out_dir)
    holds_run = bool(ckpt.list_checkpoints(out_dir / "checkpoints"))
    if holds_run and not overwrite:
        raise ValueError(f"{out_dir} already holds a run; resume it (--resume), pick another --out-dir, "
                         f"or replace it (--overwrite)")
    if not holds_run and not (out_dir / config_name).is_file():
        foreign = [name for name in logs if (out_dir / name).exists()]
        if foreign:
            raise ValueError(f"--out-dir {out_dir} holds {', '.join(foreign)} but is not a fastmlm run folder (no "
                             f"{config_name}): a run would replace them; pick another --out-dir, or move them")
        # A model folder (save_pretrained, export-hf, a Hugging Face download): a run would write its own
        # tokenizer.json over the model's and its checkpoints/ beside it, so the folder no longer loads as it did.
        model = [name for name in (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME) if (out_dir / name).exists()]
        if model:
            raise ValueError(f"--out-dir {out_dir} holds {', '.join(model)}: a model folder, not a run folder; "
                             "a run there would overwrite its tokenizer.json; pick another --out-dir")
    return holds_run


def start_fresh(out_dir: Path, overwrite: bool, ranks: Dist, keep: tuple = (), config_name: str = "train_config.json",
                logs: tuple = RUN_LOGS) -> None:
    """Clear what an earlier run left in ``out_dir``: always its ``logs`` (a run killed before its
    first checkpoint leaves some), and its checkpoints and tokenizer only with ``overwrite``
    (:func:`refuse_existing_run` refuses without it, and refuses a folder no run made that holds
    such names). ``keep``: names the new run has written already; ``config_name``: the run's config file."""
    names = list(logs)
    if refuse_existing_run(out_dir, overwrite, config_name, logs):
        names += ["checkpoints", "tokenizer.json"]
        ranks.barrier()  # every rank has looked before rank 0 deletes
    if ranks.main:
        for name in (n for n in names if n not in keep):
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def check_demo_may_replace(out_dir) -> None:
    """Refuse (ValueError) to let ``fastmlm demo`` replace a run in ``out_dir`` that it did not make.

    A demo run says ``"made_by": "demo"`` in its train_config.json (runs of the demo from before
    that field are known by their settings); a folder without checkpoints holds no run to lose.
    """
    out_dir = Path(out_dir)
    if not ckpt.list_checkpoints(out_dir / "checkpoints"):
        return
    try:
        saved = json.loads((out_dir / "train_config.json").read_text())
    except (OSError, ValueError):
        saved = {}
    legacy_demo = "made_by" not in saved and all(saved.get(k) == v for k, v in _LEGACY_DEMO.items())
    if saved.get("made_by") != "demo" and not legacy_demo:
        raise ValueError(f"{out_dir} holds a run that `fastmlm train` made, which the demo does not replace; "
                         f"give the demo another --out-dir, or move that run away")


# The settings of `fastmlm demo` runs made before train_config.json said "made_by".
_LEGACY_DEMO = {"model": "mini", "data": None, "vocab_size": 4000, "seq_len": 64, "batch_size": 16, "lr": 1e-3,
                "warmup_steps": 30, "min_lr_ratio": 0.1, "eval_every": 250, "save_every": 250, "log_every": 20}


def write_config(cfg: TrainConfig, ranks: Dist) -> None:
    """Create the run folder and write its ``train_config.json`` (main rank), then wait for every rank."""
    out_dir = Path(cfg.out_dir)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    ranks.barrier()


def no_training_text(train_files) -> str:
    """The error for training text without a document (``train_files``: a list of paths or a HeldOut):
    which text it is, and why, when --data was one document, which its held-out slice took."""
    if not isinstance(train_files, HeldOut):
        return f"--data: {[str(f) for f in train_files]} holds no text to train on"
    message = f"--data: {train_files} holds no text to train on"
    if next(read_documents(dataclasses.replace(train_files, part="valid")), None) is not None:
        message += (" (the first document of --data is always held out for validation: give more documents, "
                    "separated by blank lines, or --valid-data, or --valid-holdout 0)")
    return message


def prepare_tokenizer(cfg: TrainConfig, train_files, ranks: Dist):
    """Load the configured tokenizer, or train one on the training data (main rank) and share it via out_dir.

    A fresh run always trains its own (a leftover tokenizer.json may have another vocabulary size);
    pass ``tokenizer`` to reuse one.
    """
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    path = Path(cfg.out_dir) / "tokenizer.json"
    if ranks.main:
        tok = train_tokenizer(read_documents(train_files), vocab_size=cfg.vocab_size)
        tok.save(str(path))
    ranks.barrier()
    return load_tokenizer(path)


# --------------------------------------------------------------------------- the log
class Logger:
    """CSV rows (and TensorBoard scalars when tensorboard is installed), on the main rank only."""

    FIELDS = ("step", "split", "loss", "accuracy", "perplexity", "lr", "tokens_per_s", "packing_efficiency",
              "elapsed_s")

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.path = out_dir / "log.csv"
        if resume_step and self.path.exists():  # drop rows a killed run wrote after its checkpoint
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)
            ckpt.write_text_atomic(self.path, text.getvalue())  # a kill now leaves the old log, not an empty one
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if new:
            self.writer.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: CSV only
            self.tb = None

    def log(self, **row):
        if not self.enabled:
            return
        self.writer.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "accuracy", "perplexity", "lr", "tokens_per_s"):
                if isinstance(row.get(key), (int, float)):
                    self.tb.add_scalar(f"{row['split']}/{key}", row[key], row["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
