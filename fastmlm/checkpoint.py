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

:func:`capture_trainer_state` builds ``trainer_state.pt`` (every rank's RNG states
included) and :func:`restore_trainer_state` puts it back. The run folder ``<run>/`` around
the checkpoints (its lock, log, summary, and the leftovers of killed saves) is
fastmlm.run_dir's.
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
    """A checkpoint that is missing, incomplete or corrupt, or a Hugging Face folder fastmlm cannot read
    or write as it is (fastmlm.hf raises it too; the message says why)."""


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


def undo_folder(folder: Path, made: bool) -> None:
    """Put ``folder``, new or empty before a write into it failed, back as it was: removed when the write
    ``made`` it, else emptied again (so the same command can run again; a half-written folder is refused)."""
    folder = Path(folder)
    if made:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
    return publish_checkpoint(root, tmp, step, keep)


def publish_checkpoint(root: Path, tmp: Path, step: int, keep: int = 2) -> Path:
    """Make the fully written folder ``tmp`` checkpoint ``step`` of ``root``: manifest (sha256 of every file,
    sub-folders included), fsync, rename into place, ``latest``, and keep only the newest ``keep``."""
    root, tmp = Path(root), Path(tmp)
    final = root / f"step_{step:08d}"
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")  # replacing save_pretrained's manifest
                   if p.is_file() and p.name != MANIFEST)
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
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):  # a damaged pointer is no error: the newest checkpoint is found below
            name = ""
        # only a checkpoint of this folder: "../other/step_..." or a name with a NUL byte (a ValueError) is ignored
        if re.fullmatch(r"step_\d+", name) and (root / name).is_dir():
            return root / name
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
    file = Path(path) / STATE
    if not file.is_file():  # a model folder (save_pretrained, an export) has weights but no trainer state
        raise CheckpointError(f"{path} holds no {STATE}: a model folder, not a training checkpoint to resume")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own message is pages long and suggests weights_only=False: not here
        raise CheckpointError(f"cannot read {file}: not a trainer state fastmlm saved, or corrupt "
                              f"({type(exc).__name__})") from None


def write_manifest(folder: Path, names, **fields) -> dict:
    """Write ``folder/manifest.json``: the sha256 of each named file in ``folder`` (plus ``fields``).

    Written last and atomically, so a folder whose manifest verifies holds every file it lists.
    FastMLMForMaskedLM.save_pretrained uses it for config.json and model.safetensors.
    """
    folder = Path(folder)
    manifest = {"format": FORMAT, **fields, "sha256": {name: _sha256(folder / name) for name in sorted(names)}}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


# --------------------------------------------------------------------------- trainer state
def capture_trainer_state(step: int, data_position: int, optimizer, scheduler, scaler, train_config: dict,
                          device: torch.device, world_size: int = 1, data_epoch_batches: Optional[int] = None,
                          sharded: bool = False) -> dict:
    """What ``trainer_state.pt`` holds to continue a run exactly (read back by :func:`restore_trainer_state`).

    Arguments:
        step: optimizer steps taken.
        data_position: batches the training stream has yielded (``BatchStream.position``).
        optimizer, scheduler, scaler: the AdamW optimizer, lr scheduler and grad scaler (their
            ``state_dict()`` is kept).
        train_config: the run's ``TrainConfig.to_dict()``, kept as JSON text.
        device: the training device; on a GPU its CUDA RNG state is kept too.
        world_size: the number of ranks. Above 1 this is a collective (every rank's RNG states
            and epoch lengths are gathered with ``all_gather_object``): call it on every rank.
        data_epoch_batches: this rank's batches per epoch (``BatchStream.epoch_batches``), None
            before the stream has finished its first epoch; a resumed stream skips whole epochs with it.
        sharded: the optimizer state is in the checkpoint's sharded part (fastmlm.sharded_checkpoint),
            so ``"optimizer"`` is None here.
    Returns:
        ``{"step", "data_position", "data_epoch_batches", "optimizer", "scheduler", "scaler",
        "rng_cpu", "rng_cuda", "train_config"}``; ``rng_cpu``, ``rng_cuda`` and
        ``data_epoch_batches`` hold one entry per rank, in rank order (``rng_cuda`` is empty on
        the CPU). Plain tensors and containers only, so :func:`load_trainer_state` reads it with
        ``weights_only=True``.
    """
    rng_cpu = [torch.get_rng_state()]
    rng_cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    epoch_batches = [data_epoch_batches]
    if world_size > 1:
        import torch.distributed as dist

        rng_cpu = [None] * world_size
        dist.all_gather_object(rng_cpu, torch.get_rng_state())
        epoch_batches = [None] * world_size
        dist.all_gather_object(epoch_batches, data_epoch_batches)
        if device.type == "cuda":
            rng_cuda = [None] * world_size
            dist.all_gather_object(rng_cuda, torch.cuda.get_rng_state(device))
    return {"step": step, "data_position": data_position, "data_epoch_batches": epoch_batches,
            "optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_cpu": rng_cpu, "rng_cuda": rng_cuda,
            "train_config": json.dumps(train_config)}


def restore_trainer_state(state: dict, optimizer, scheduler, scaler, device: torch.device, rank: int = 0,
                          world_size: int = 1) -> bool:
    """Load what :func:`capture_trainer_state` kept into ``optimizer``, ``scheduler``, ``scaler`` and this rank's RNGs.

    Arguments:
        state: a trainer state (:func:`load_trainer_state`).
        optimizer, scheduler, scaler: built as for a fresh run; their states are replaced.
        device: the training device (its CUDA RNG state comes back on a GPU).
        rank, world_size: this process's rank and the number of ranks now.
    Returns:
        whether the RNG states came back: False when the run was saved with another number of
        ranks, and then the CPU (and CUDA) RNGs keep the seed they have. ``step``,
        ``data_position`` and :func:`saved_epoch_batches` are the caller's to read from ``state``.
    """
    if state["optimizer"] is not None:  # else it came back with the sharded weights
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng_cpu"]
    restored = len(rng) == world_size
    if restored:
        torch.set_rng_state(rng[rank])
    if device.type == "cuda" and len(state.get("rng_cuda", [])) == world_size:
        torch.cuda.set_rng_state(state["rng_cuda"][rank], device)
    return restored


def saved_epoch_batches(state: dict, rank: int = 0, world_size: int = 1) -> Optional[int]:
    """This rank's saved batches per epoch, or None (not known yet, an older checkpoint, another world size)."""
    saved = state.get("data_epoch_batches") or []
    return saved[rank] if len(saved) == world_size else None


# ---- model files: config.json + model.safetensors + manifest.json ------------------------------
# The folder FastMLMForMaskedLM.save_pretrained writes and from_pretrained reads (its methods call
# these). fastmlm.hf uses the same two file names for Hugging Face folders.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MODEL = "FastMLMForMaskedLM"  # named in the errors below, as in the model's own


def _model_error(msg: str):
    raise ValueError(f"{_MODEL}: {msg}")


def read_safetensors(file) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors, turning any parse failure into a clear ValueError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise ValueError(f"cannot read {file}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None


def save_model_folder(model, directory) -> Path:
    """Write config.json, model.safetensors and their manifest.json into ``directory`` (created if needed).

    Arguments:
        model: a FastMLMForMaskedLM (its ``config`` and ``state_dict()`` are written).
        directory: the folder; files already there with the same names are replaced.
    Returns:
        the folder as a Path. The manifest (sha256 of the two files) lets
        ``fastmlm.predict.load_checkpoint`` verify it; a tokenizer added beside them later
        loads but is not covered by it.
    """
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps({"model_type": "fastmlm", **model.config.to_dict()}, indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "model_type": "fastmlm"})
    write_manifest(path, [CONFIG_NAME, WEIGHTS_NAME])
    return path


# ModelConfig fields that a checkpoint's weights were trained with. An override of one would run them as
# another function (a gelu model as relu, 12 heads split as 6), mostly with no shape mismatch to stop it.
FIXED_BY_WEIGHTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "activation", "norm_position")


def refuse_changing_overrides(saved, overrides: dict) -> None:
    """CheckpointError when ``overrides`` give a :data:`FIXED_BY_WEIGHTS` field another value than the
    checkpoint's ``saved`` config (a ModelConfig, or a dict of its fields); the same value is accepted."""
    value = saved.get if isinstance(saved, dict) else lambda k: getattr(saved, k)
    changed = {k: v for k, v in overrides.items() if k in FIXED_BY_WEIGHTS and v != value(k)}
    if changed:
        raise CheckpointError(f"config overrides {changed} would change what the checkpoint computes (its config "
                              f"gives {', '.join(f'{k}={value(k)!r}' for k in changed)}); overrides are for "
                              "settings the checkpoint does not fix, such as attention_backend or hidden_dropout")


def load_model_folder(model_class, directory, **config_overrides):
    """Read what :func:`save_model_folder` wrote (safetensors only); clear ValueErrors on bad files.

    Arguments:
        model_class: FastMLMForMaskedLM (or a subclass), built as ``model_class(cfg, pooler=...)``.
        directory: the folder holding config.json and model.safetensors.
        config_overrides: ModelConfig fields that the weights do not fix (e.g. ``attention_backend``,
            ``hidden_dropout``); one of :data:`FIXED_BY_WEIGHTS` may only be given its saved value.
    Returns:
        the model, with a pooler when the weights hold one. The manifest is not checked here:
        ``fastmlm.predict.load_checkpoint`` and training resume verify it.
    """
    from .config import ModelConfig

    path = Path(directory)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            _model_error(f"{f} not found: a fastmlm checkpoint directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _model_error(f"{cfg_file} is not valid JSON ({exc})")
    if not isinstance(data, dict) or data.get("model_type") != "fastmlm":
        kind = data.get("model_type") if isinstance(data, dict) else None
        hint = " Load Hugging Face checkpoints with fastmlm.hf.load_hf(directory)." if kind == "bert" else ""
        _model_error(f"{cfg_file} is not a fastmlm config (model_type={kind!r}).{hint}")
    data.pop("model_type")
    try:
        refuse_changing_overrides(ModelConfig.from_dict(data), config_overrides)
        cfg = ModelConfig.from_dict({**data, **config_overrides})
    except CheckpointError:
        raise
    except ValueError as exc:  # a field of the wrong type or value: say in which file
        _model_error(f"{cfg_file}: {exc}")
    tensors = read_safetensors(weights_file)
    model = model_class(cfg, pooler=any(k.startswith("pooler.") for k in tensors))
    load_model_weights(model, tensors)
    return model


def load_model_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a full state dict into ``model``; ValueError listing missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        _model_error("checkpoint does not match the model:"
                     + (f"\n  missing keys: {missing}" if missing else "")
                     + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                     + (f"\n  shape mismatches: {shapes}" if shapes else ""))
    model.load_state_dict(tensors, strict=True)
