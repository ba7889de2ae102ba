"""``fastmlm train --dry-run``: the memory one rank needs for a run, without training.

    parameters      fp32 master weights (FSDP: 1/world of them, plus the bf16/fp16 copy of the
                    largest unsharded group while it computes, and the next one, prefetched)
    gradients       fp32, one per parameter (DDP: plus its communication buckets, as large again;
                    FSDP: 1/world of them, reduced in fp32)
    optimizer       AdamW: two fp32 moments per parameter (FSDP: 1/world)
    activations     what autograd keeps for the backward of one micro-batch, *measured*: a copy
                    of the model with 1 and with 2 encoder layers runs one forward on a small
                    batch at the run's width, precision and layout, and every tensor saved for the
                    backward is counted (each storage once). Per layer and per token that is
                    exact; it is scaled to the run's tokens (attention kernels keep O(tokens),
                    never the O(seq_len^2) scores). With activation checkpointing a layer keeps
                    its input and the fused attention's outputs, and the layer being recomputed
                    holds its full activations for a moment.

Not counted: the CUDA context and allocator fragmentation (often 0.5-2 GiB on a GPU), data
loading, and transient workspace of the kernels. ``--memory-gib N`` compares the total with N.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .config import TrainConfig

GIB = 1024 ** 3
_PROBE_TOKENS = 64  # the longest row of the measured forwards (per-token costs do not depend on it)


@dataclass
class MemoryPlan:
    """Bytes one rank needs (module docstring); ``total`` is their sum."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    n_params: int
    world_size: int
    notes: list

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def _vocab_size(cfg: TrainConfig) -> int:
    """The vocabulary the run will have: --tokenizer's, a shard folder's, else --vocab-size."""
    from .shards import ShardSet, shard_folder

    if cfg.tokenizer:
        from .tokenizer import load_tokenizer

        return load_tokenizer(cfg.tokenizer).get_vocab_size(with_added_tokens=True)
    folder = shard_folder(cfg.data)
    return ShardSet(folder).vocab_size if folder is not None else cfg.vocab_size


def _amp_dtype(cfg: TrainConfig) -> Optional[torch.dtype]:
    """The autocast dtype the run would use (auto: bf16 when the run's device is a GPU)."""
    if cfg.precision == "auto":
        gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        return torch.bfloat16 if gpu else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def saved_activation_bytes(model, batch, amp_dtype: Optional[torch.dtype]) -> int:
    """Bytes of the tensors autograd saves in one forward of ``model`` on ``batch``: each storage once,
    the parameters' own storages not (they are the parameters), autocast's low-precision copies of
    them yes (they live until the backward)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(**batch.model_inputs(), loss_reduction="sum")
    return sum(seen.values())


def synthetic_batch(cfg: TrainConfig, vocab: int, rows: int, seq: int):
    """A full (rows, seq) batch in the run's layout with the run's share of masked tokens."""
    from . import data

    gen = torch.Generator().manual_seed(0)
    tokens = rows * seq
    ids = torch.randint(5, vocab, (rows, seq), generator=gen)
    positions = torch.randperm(tokens, generator=gen)[:max(1, round(cfg.mask_rate * tokens))].sort().values
    labels = torch.full((tokens,), data.IGNORE_INDEX)
    labels[positions] = ids.view(-1)[positions]
    if cfg.layout == "packed":
        return data.Batch(ids.view(-1), labels, positions, max_seqlen=seq,
                          cu_seqlens=torch.arange(0, tokens + 1, seq, dtype=torch.int32))
    return data.Batch(ids, labels.view(rows, seq), positions)


def _measure(model_cfg, cfg: TrainConfig, amp_dtype) -> dict:
    """What one micro-batch's forward saves, split into per-token and fixed parts, for one encoder layer
    (``layer_token``, ``layer_fixed``) and for the rest of the model (``rest_token``, ``rest_fixed``): from
    forwards of 1- and 2-layer copies on 1 and 2 rows of ``min(seq_len, 64)`` tokens, on the CPU."""
    from .model import FastMLMForMaskedLM

    seq = min(cfg.seq_len, _PROBE_TOKENS)
    m = {}
    for layers in (1, 2):
        with torch.device("meta"):
            model = FastMLMForMaskedLM(dataclasses.replace(model_cfg, num_layers=layers))
        model.to_empty(device="cpu")
        for param in model.parameters():  # the values do not change what is saved; zeros are quick
            torch.nn.init.zeros_(param)
        for rows in (1, 2):
            m[layers, rows] = saved_activation_bytes(model, synthetic_batch(cfg, model_cfg.vocab_size, rows, seq),
                                                     amp_dtype)
    layer_token = ((m[2, 2] - m[1, 2]) - (m[2, 1] - m[1, 1])) / seq
    layer_fixed = (m[2, 1] - m[1, 1]) - layer_token * seq
    rest_token = (m[1, 2] - m[1, 1]) / seq - layer_token
    rest_fixed = m[1, 1] - (rest_token + layer_token) * seq - layer_fixed
    return dict(layer_token=layer_token, layer_fixed=max(0.0, layer_fixed), rest_token=rest_token,
                rest_fixed=max(0.0, rest_fixed))


def plan(cfg: TrainConfig, world_size: int = 1, fsdp: bool = False) -> MemoryPlan:
    """The memory plan of ``cfg`` on each of ``world_size`` ranks (module docstring)."""
    from .model import FastMLMForMaskedLM
    from .train import sized_model_config

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    model_cfg = sized_model_config(cfg, _vocab_size(cfg))
    with torch.device("meta"):
        full = FastMLMForMaskedLM(model_cfg)
    n_params = sum(p.numel() for p in full.parameters())
    largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in full.layers)
    outside_layers = n_params - sum(p.numel() for layer in full.layers for p in layer.parameters())
    amp_dtype = _amp_dtype(cfg)
    low = torch.finfo(amp_dtype).bits // 8 if amp_dtype is not None else 4
    notes = []
    if fsdp:
        shard = -(-n_params // world_size)
        # the unsharded low-precision copy of what computes now and what is prefetched next
        gathered = (max(largest_layer, outside_layers) + largest_layer) * low
        parameters, gradients, optimizer = 4 * shard + gathered, 4 * shard, 8 * shard
        notes.append(f"FSDP over {world_size} rank(s): parameters, gradients and optimizer state sharded; "
                     f"{gathered / GIB:.2f} GiB of gathered {'fp32' if low == 4 else 'bf16/fp16'} weights in flight")
    else:
        buckets = 4 * n_params if world_size > 1 else 0
        parameters, gradients, optimizer = 4 * n_params, 4 * n_params + buckets, 8 * n_params
        if buckets:
            notes.append("DDP: gradient buckets as large as the gradients")
    m = _measure(model_cfg, cfg, amp_dtype)
    tokens, layers = cfg.batch_size * cfg.seq_len, model_cfg.num_layers
    activations = m["rest_fixed"] + layers * m["layer_fixed"] + tokens * m["rest_token"]
    if cfg.activation_checkpointing:
        # kept per layer: its input (fp32 residual stream), the attention output and its fp32 log-sum-exp
        kept = model_cfg.hidden_size * (4 + low) + model_cfg.num_heads * 4
        activations += tokens * (layers * kept + m["layer_token"])
        notes.append("activation checkpointing: each layer keeps its input and the attention's outputs; one "
                     "layer's activations are recomputed at a time")
    else:
        activations += tokens * layers * m["layer_token"]
    return MemoryPlan(int(parameters), int(gradients), int(optimizer), int(activations), n_params, world_size, notes)


def describe(cfg: TrainConfig, p: MemoryPlan, memory_gib: Optional[float] = None) -> str:
    """The plan as the lines ``--dry-run`` prints."""
    amp = _amp_dtype(cfg)
    lines = [f"fastmlm train --dry-run: {cfg.model} model, {p.n_params / 1e6:.1f}M parameters, "
             f"{cfg.batch_size} x {cfg.seq_len} tokens per micro-batch, precision {amp or torch.float32}, "
             f"{p.world_size} rank(s){', FSDP' if getattr(cfg, 'fsdp', False) else ''}"
             f"{', activation checkpointing' if cfg.activation_checkpointing else ''}",
             "per rank:"]
    for name in ("parameters", "gradients", "optimizer", "activations"):
        lines.append(f"  {name:<12} {getattr(p, name) / GIB:9.3f} GiB")
    lines.append(f"  {'total':<12} {p.total / GIB:9.3f} GiB (not counted: CUDA context, allocator slack, "
                 f"kernel workspace)")
    lines += [f"  note: {n}" for n in p.notes]
    if memory_gib is not None:
        fits = p.total <= memory_gib * GIB
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {memory_gib:g} GiB "
                     f"({p.total / (memory_gib * GIB):.0%} of it)")
    return "\n".join(lines)


def dry_run(cfg: TrainConfig) -> MemoryPlan:
    """Print the plan of ``cfg`` for this launch's world size (WORLD_SIZE, as torchrun sets; else 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    p = plan(cfg, world_size, fsdp=getattr(cfg, "fsdp", False))
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(cfg, p, cfg.memory_gib))
    return p
