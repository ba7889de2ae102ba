"""Checkpoints of FSDP runs: the weights and optimizer state sharded (torch.distributed.checkpoint).

    step_00000100/
        dcp/                       model + optimizer state, one file per rank (DCP), keyed by
                                   parameter name: loads on the same or another number of ranks
        config.json, model.safetensors   the full weights as well (gathered once per save), so
                                   fill-mask, eval and export-hf read an FSDP run like any other
        tokenizer.json, trainer_state.pt (without the optimizer), manifest.json

Every rank writes its shard into the same temporary folder (named by the step, not the
process); rank 0 writes the rest and publishes the folder as fastmlm.checkpoint does (manifest
of every file, then one rename), so a kill while saving leaves the previous checkpoint.
"""
from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .distributed import Dist

DCP_DIR = "dcp"


def is_sharded_checkpoint(path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def save_sharded(root, step: int, model, optimizer, tokenizer, state: dict, ranks: Dist, keep: int = 2) -> Path:
    """Write checkpoint ``step`` of an FSDP run under ``root`` (a collective: call it on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    root = Path(root)
    tmp = root / f".step_{step:08d}.tmp-sharded"
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_is_fine():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = None
    if ranks.main:
        ckpt.save_model_folder(_StateHolder(model, full), tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))
        torch.save(state, tmp / ckpt.STATE)
        final = ckpt.publish_checkpoint(root, tmp, step, keep)
    ranks.barrier()
    return final or root / f"step_{step:08d}"


def load_sharded(path, model, optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer state into ``model`` (sharded by FSDP2 on any number
    of ranks, or a plain model on one process) and ``optimizer``; CheckpointError when it cannot."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    wanted = {"model": model_state, "optimizer": optim_state}
    try:
        with _one_process_is_fine():
            dcp.load(wanted, checkpoint_id=str(Path(path) / DCP_DIR))
    except Exception as exc:  # DCP raises CheckpointException with every rank's error
        raise ckpt.CheckpointError(f"cannot load the sharded state of {path}: {type(exc).__name__}: "
                                   f"{str(exc)[:500]}") from None
    set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optimizer"])


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns that it assumes one process when there is no process group: that is what --fsdp on one
    process means, so the warning is silenced there (and only there)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
        yield


class _StateHolder:
    """What save_model_folder reads from a model (its config and state dict), with a gathered full state dict."""

    def __init__(self, model, state: dict):
        self.config, self._state = model.config, state

    def state_dict(self) -> dict:
        return self._state
