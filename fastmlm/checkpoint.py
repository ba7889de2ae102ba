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
"""
from __future__ import annotations

import hashlib
import json
import os
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


def _write_text_atomic(path: Path, text: str) -> None:
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
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {"format": FORMAT, "step": step, "sha256": {name: _sha256(tmp / name) for name in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for name in files + [MANIFEST]:  # on disk before the rename makes the checkpoint visible
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".{final.name}.old{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name + "\n")
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
