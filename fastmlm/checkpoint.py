"""Training checkpoints: written atomically, verified by checksum, resumable exactly.

A checkpoint is a folder ``<run>/checkpoints/step_00000100/`` holding

    config.json, model.safetensors   the model (FastMLMForMaskedLM.save_pretrained)
    tokenizer.json                   the tokenizer the run uses
    trainer_state.pt                 optimizer, scheduler, grad scaler, RNG states, data
                                     position, step, training config (plain tensors and
                                     containers only: loaded with ``weights_only=True``)
    manifest.json                    sha256 of every file above, written last

It is first written under a temporary name and renamed into place, so a run killed
while saving leaves either the previous checkpoint or the new one, never half of one.
``<run>/checkpoints/latest`` names the newest complete checkpoint.

The run folder ``<run>/`` around them (log.csv, summary.json, train_config.json, the
tokenizer a run trained) belongs to one training process at a time: :class:`RunLock`
holds ``<run>/.lock`` while it trains, and under that lock the temporaries of saves a
killed run left behind are removed (:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
LATEST = "latest"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step: a kill leaves the old file or the new one, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: Path, step: int, model, tokenizer, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep only the newest ``keep`` ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save(str(tmp / "tokenizer.json"))
    torch.save(state, tmp / STATE)
    files = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)  # replacing save_pretrained's manifest
    for name in files:  # on disk before the rename makes the checkpoint visible
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    write_manifest(tmp, files, step=step)  # fsynced too
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".{final.name}.old{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name + "\n")
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).exists())


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint named by ``latest`` (or the newest one found), None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if named.is_dir():
            return named
    found = list_checkpoints(root)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        sums = manifest["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: an incomplete checkpoint, or not a fastmlm one") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path}/{MANIFEST} is corrupt") from None
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def load_trainer_state(path: Path) -> dict:
    """The verified trainer state of a checkpoint (tensors on the CPU)."""
    verify_checkpoint(path)
    try:
        return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {Path(path) / STATE}: {type(exc).__name__}: {exc}") from None


def write_manifest(folder: Path, names, **fields) -> dict:
    """Write ``folder/manifest.json``: the sha256 of each named file in ``folder`` (plus ``fields``).

    Written last and atomically, so a folder whose manifest verifies holds every file it lists.
    FastMLMForMaskedLM.save_pretrained uses it for config.json and model.safetensors.
    """
    folder = Path(folder)
    manifest = {"format": FORMAT, **fields, "sha256": {name: _sha256(folder / name) for name in sorted(names)}}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


# --------------------------------------------------------------------------- run folders
LOCK = ".lock"
# The temporaries written above: ".step_00000100.tmp<pid>", ".step_00000100.old<pid>", ".latest.tmp<pid>", ...
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

        self.run_dir.mkdir(parents=True, exist_ok=True)
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
