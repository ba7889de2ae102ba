"""The MLM training loop: one linear function, :func:`train`.

    tokenizer (trained or loaded) ─► model (preset + vocab) ─► AdamW + warm-up/decay schedule
    for each step:
        grad_accum micro-batches from the BatchStream (dynamic masking, packed rows)
        loss = Σ masked-token losses / (masked tokens in all micro-batches, all ranks)
        backward (DDP syncs on the last micro-batch), clip, step, schedule
        every log_every: CSV row + progress bar;  every eval_every: validation accuracy/ppl
        every save_every: atomic checkpoint (fastmlm/checkpoint.py)

``resume`` continues a stopped run exactly: the model, optimizer, scheduler, grad scaler,
every rank's RNG state and the data position come back from the checkpoint, so the
remaining steps see the same batches, masks and dropout as an uninterrupted run. Only the
RESUMABLE fields of the config (fastmlm.config) may change on resume; a finished run is left alone.

The run folder is locked while a run trains in it (fastmlm.checkpoint.RunLock). A loss or
weight that becomes NaN/inf stops the run (TrainingDiverged, naming the step) without
writing it to a checkpoint; the check reads only what the loop reads anyway (the loss at
each log step, the weights once before each save).

Distributed data parallel: run under ``torchrun``; each rank reads every
``world_size``-th document, and the loss is normalised by the global masked-token count.
Gloo on the CPU, NCCL on GPUs.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import data
from .config import preset
# the training config lives in fastmlm.config; these names stay importable from here
from .config import RESUMABLE, TRAIN_PRESETS, TrainConfig, resumed_config, train_preset  # noqa: F401
from .model import WEIGHTS_NAME, FastMLMForMaskedLM, read_safetensors


# --------------------------------------------------------------------------- pieces
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def model_config(cfg: TrainConfig, tokenizer):
    """The run's ModelConfig: the preset, sized to the tokenizer, with the run's overrides."""
    return preset(cfg.model, **{"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                                "pad_token_id": data.special_ids(tokenizer).pad,
                                "max_position_embeddings": max(cfg.seq_len, 128), **cfg.model_overrides})


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay); biases and LayerNorm weights (1-d parameters) are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def all_min(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device named by a ``--device`` value: "auto" (the GPU when there is one), "cpu", "cuda" or "cuda:N".

    ValueError names the value and what is expected, also when it names a GPU this machine lacks.
    CUDA is queried here, when a command runs, never at import.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not a device fastmlm runs on; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: no CUDA GPU is available on this machine "
                         f"(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: GPU {index} does not exist; this machine has "
                         f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; pick the device (each rank its own GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    info = Dist()
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        info = Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return info, device


def _launch_rank() -> int:
    """This process's rank, known before the process group exists (torchrun sets RANK)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


@torch.no_grad()
def evaluate(model, batches, device, amp_dtype=None, ranks: Dist = Dist()) -> dict:
    """Masked-token loss, accuracy and perplexity over ``batches`` (summed over ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, masked
    for batch in batches:
        with autocast(device, amp_dtype):
            out = model(**batch.to(device).model_inputs(), loss_reduction="sum")
        totals += torch.stack([out.loss.double(), out.n_correct.double(), out.n_masked.double()])
    loss_sum, correct, masked = ranks.all_sum(totals).tolist()  # the one host sync of an evaluation
    model.train(was_training)
    mean = loss_sum / masked if masked else float("nan")
    return {"loss": mean, "accuracy": correct / masked if masked else float("nan"),
            "perplexity": _exp(mean) if masked else float("nan"), "n_masked": int(masked)}


def _exp(x: float) -> float:
    """exp(x), inf past the float range (a diverging run's perplexity) instead of OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def accumulate_gradients(net, micro, device, amp_dtype=None, scaler=None, ranks: Dist = Dist()) -> torch.Tensor:
    """Forward/backward every micro-batch of one step; return the step's summed loss (fp64, on device).

    The gradient is that of  Σ_micro Σ_masked loss / N  with N the masked tokens of the
    whole step on all ranks, as if the step were one big batch: each micro-batch's summed
    loss is divided by N (times world_size, because DDP averages gradients over ranks).
    N comes from the collator's host-side counts, so no device value is read back.
    """
    # On the training device: NCCL reduces CUDA tensors only (gloo takes CPU ones).
    step_masked = ranks.all_sum(torch.tensor([float(sum(b.n_masked for b in micro))], dtype=torch.float64,
                                             device=device))
    scale = ranks.world_size / step_masked.clamp(min=1.0)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            with autocast(device, amp_dtype):
                out = net(**batch.to(device, non_blocking=True).model_inputs(), loss_reduction="sum")
            loss = out.loss * scale.to(out.loss.dtype)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += out.loss.detach().double()
    return step_loss


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


def _say(ranks: Dist, msg: str, bar=None):
    if ranks.main:
        (bar.write if bar is not None else print)(msg)


def _prepare_tokenizer(cfg: TrainConfig, out_dir: Path, train_files, ranks: Dist):
    """Load the configured tokenizer, or train one on the training data (main rank) and share it via out_dir.

    A fresh run always trains its own (a leftover tokenizer.json may have another vocabulary size);
    pass ``tokenizer`` to reuse one.
    """
    if cfg.tokenizer:
        return data.load_tokenizer(cfg.tokenizer)
    path = out_dir / "tokenizer.json"
    if ranks.main:
        tok = data.train_tokenizer(data.read_documents(train_files), vocab_size=cfg.vocab_size)
        tok.save(str(path))
    ranks.barrier()
    return data.load_tokenizer(path)


# --------------------------------------------------------------------------- run folder
class TrainingDiverged(ValueError):
    """The loss or the weights became NaN/inf: the run stopped without saving them."""


def _diverged(step: int, what: str, out_dir: Path, cfg: TrainConfig) -> TrainingDiverged:
    last = ckpt.latest_checkpoint(out_dir / "checkpoints")
    kept = f"the last checkpoint, all finite, is {last}" if last else "no checkpoint was saved"
    return TrainingDiverged(f"step {step}: {what} became NaN/inf, so the run stopped without saving ({kept}); "
                            f"start again with a lower --lr (it is {cfg.lr:g}) or more --warmup-steps")


def _weights_finite(model) -> bool:
    """Whether every parameter is finite: one host sync, before each save only."""
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _open_resumed(cfg: TrainConfig, resume: str, changes: Optional[dict]):
    """(run config, checkpoint folder, trainer state) of the run to resume (see :func:`resumed_config`)."""
    root = Path(cfg.out_dir) / "checkpoints"
    resume_from = ckpt.latest_checkpoint(root) if resume == "latest" else Path(resume)
    if resume_from is None:
        raise ckpt.CheckpointError(f"--resume: no checkpoint under {root}")
    state = ckpt.load_trainer_state(resume_from)
    saved = TrainConfig.from_dict(json.loads(state["train_config"]))
    return resumed_config(saved, cfg, changes), resume_from, state


def _nothing_to_do(cfg: TrainConfig, step: int, resume_from: Path, ranks: Dist) -> dict:
    """A resumed run already at its last step: say so, touch nothing, return the run's summary."""
    out_dir = Path(cfg.out_dir)
    if step >= cfg.max_steps:
        msg = f"the run in {out_dir} is finished (step {step} of max_steps {cfg.max_steps}); nothing to do: " \
              f"raise --max-steps to extend it"
    else:
        msg = f"the run in {out_dir} is at step {step}, at or past --stop-after {cfg.stop_after}; nothing to do"
    _say(ranks, f"fastmlm train: {msg}")
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):  # killed between its last checkpoint and the summary
        summary = {"step": step, "checkpoint": str(resume_from)}
    return {**summary, "rank": ranks.rank, "nothing_to_do": msg}


def _start_fresh(out_dir: Path, overwrite: bool, ranks: Dist) -> None:
    """Clear what an earlier run left in ``out_dir``: always its logs (a run killed before its
    first checkpoint leaves some), and its checkpoints and tokenizer only with ``overwrite``."""
    names = ["log.csv", "summary.json", "tensorboard"]
    if ckpt.list_checkpoints(out_dir / "checkpoints"):
        if not overwrite:
            raise ValueError(f"{out_dir} already holds a run; resume it (--resume), pick another --out-dir, "
                             f"or replace it (--overwrite)")
        names += ["checkpoints", "tokenizer.json"]
        ranks.barrier()  # every rank has looked before rank 0 deletes
    if ranks.main:
        for name in names:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: Optional[str] = None, overwrite: bool = False, *,
          changes: Optional[dict] = None) -> dict:
    """Train (or, with ``resume`` = a checkpoint folder or "latest", continue) a run; return a summary.

    On resume the saved TrainConfig is used, except ``stop_after``, ``progress`` and
    ``out_dir``, taken from ``cfg``, and ``changes`` (the fields the caller asks for; only
    RESUMABLE ones may differ from the run, see :func:`resumed_config`). A run already at its
    last step changes nothing and returns its summary with a ``nothing_to_do`` message. A
    fresh run refuses an ``out_dir`` that already holds checkpoints unless ``overwrite``
    (which deletes that run's checkpoints and logs).

    The run folder is locked for the whole run (rank 0 holds the lock): another process
    training into it is refused. A NaN/inf loss or weight stops the run with
    TrainingDiverged naming the step; no checkpoint with a non-finite value is written.
    """
    if changes and not resume:
        raise ValueError("train(changes=...) applies to a resumed run; for a new run put the values in cfg")
    cfg.validate()
    resolve_device(cfg.device)  # a wrong device fails before the run folder is touched
    lock = ckpt.RunLock(cfg.out_dir).acquire() if _launch_rank() == 0 else None
    try:
        if lock is not None:
            ckpt.remove_stale_temporaries(cfg.out_dir)  # no other process writes here while we hold the lock
        return _train_locked(cfg, resume, overwrite, changes)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: TrainConfig, resume: Optional[str], overwrite: bool, changes: Optional[dict]) -> dict:
    resume_from, state = None, None
    if resume:
        cfg, resume_from, state = _open_resumed(cfg, resume, changes)
    ranks, device = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    if state is not None and state["step"] >= min(cfg.max_steps, cfg.stop_after or cfg.max_steps):
        return _nothing_to_do(cfg, state["step"], resume_from, ranks)
    if state is None:
        _start_fresh(out_dir, overwrite, ranks)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    ranks.barrier()

    train_files = cfg.data or [data.bundled_corpus("train")]
    valid_files = cfg.valid_data or ([data.bundled_corpus("valid")] if cfg.data is None else None)
    tokenizer = (data.load_tokenizer(resume_from / "tokenizer.json") if resume_from
                 else _prepare_tokenizer(cfg, out_dir, train_files, ranks))

    # Model: identical initial weights on every rank, then a per-rank dropout stream.
    torch.manual_seed(cfg.seed)
    model_cfg = model_config(cfg, tokenizer)
    model = FastMLMForMaskedLM(model_cfg).to(device)
    torch.manual_seed(cfg.seed + 1000 * ranks.rank)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, position = 0, 0
    if state is not None:
        model.load_weights(read_safetensors(resume_from / WEIGHTS_NAME))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, position = state["step"], state["data_position"]
        rng = state["rng_cpu"]
        if len(rng) == ranks.world_size:
            torch.set_rng_state(rng[ranks.rank])
        else:
            _say(ranks, f"resume: saved with {len(rng)} ranks, now {ranks.world_size}: dropout RNG reseeded")
        if device.type == "cuda" and len(state.get("rng_cuda", [])) == ranks.world_size:
            torch.cuda.set_rng_state(state["rng_cuda"][ranks.rank], device)
    net = model
    if ranks.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    collator = data.MaskingCollator(tokenizer, cfg.seq_len, cfg.batch_size, cfg.mask_rate, cfg.whole_word, cfg.layout)
    stream = data.BatchStream(train_files, tokenizer, collator, seed=cfg.seed, rank=ranks.rank,
                              world_size=ranks.world_size, start=position)
    batches = iter(stream)
    valid = (data.eval_batches(valid_files, tokenizer, collator, max_batches=cfg.eval_batches, rank=ranks.rank,
                               world_size=ranks.world_size) if valid_files else [])
    logger = Logger(out_dir, ranks.main, resume_step=step)
    n_params = sum(p.numel() for p in model.parameters())
    _say(ranks, f"fastmlm train: {cfg.model} model ({n_params / 1e6:.1f}M parameters, vocab "
                f"{model_cfg.vocab_size}) on {device}{f' x{ranks.world_size}' if ranks.world_size > 1 else ''}, "
                f"precision {amp_dtype or torch.float32}, {cfg.max_steps} steps of {cfg.grad_accum} x "
                f"{cfg.batch_size} x {cfg.seq_len} tokens" + (f", resumed at step {step}" if step else ""))

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and ranks.main), unit="step",
               dynamic_ncols=True)
    model.train()
    last_loss = float("nan")
    run_start = interval_start = time.perf_counter()
    interval_tokens, run_tokens = 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # since the last log, this rank
    masked_sum = 0
    first_bad = torch.full((), torch.iinfo(torch.int64).max, device=device)  # first step with a NaN/inf loss
    metrics: dict = {}
    stop = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    with logger, bar:  # closed however the loop ends (an error, Ctrl-C)
        while step < stop:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            step_loss = accumulate_gradients(net, micro, device, amp_dtype, scaler, ranks)
            masked_sum += sum(b.n_masked for b in micro)
            interval_tokens += sum(b.n_tokens for b in micro)
            if cfg.clip_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += step_loss
            step += 1
            first_bad = torch.where(step_loss.isfinite(), first_bad, first_bad.clamp(max=step))  # on device: no sync
            bar.update(1)

            final = step == stop
            if step % cfg.log_every == 0 or final:
                totals = ranks.all_sum(torch.stack([loss_sum, torch.tensor(float(masked_sum), dtype=torch.float64,
                                                                                     device=device)]))
                loss_total, masked_total = totals.tolist()  # host sync once per log interval
                if not math.isfinite(loss_total):  # NaN/inf on some rank: all ranks see it in the sum and stop
                    raise _diverged(min(step, int(ranks.all_min(first_bad))), "the training loss", out_dir, cfg)
                last_loss = loss_total / max(masked_total, 1.0)
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_tokens * ranks.world_size / max(elapsed, 1e-9)
                run_tokens += interval_tokens * ranks.world_size
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.1e}")
                logger.log(step=step, split="train", loss=last_loss, lr=lr, tokens_per_s=tokens_per_s,
                           packing_efficiency=stream.efficiency, elapsed_s=time.perf_counter() - run_start)
                loss_sum.zero_()
                masked_sum, interval_tokens, interval_start = 0, 0, time.perf_counter()
            if valid and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                metrics = evaluate(model, valid, device, amp_dtype, ranks)
                if metrics["n_masked"] and not math.isfinite(metrics["loss"]):  # finite weights, NaN outputs
                    raise _diverged(step, "the validation loss", out_dir, cfg)
                logger.log(step=step, split="valid", loss=metrics["loss"], accuracy=metrics["accuracy"],
                           perplexity=metrics["perplexity"], elapsed_s=time.perf_counter() - run_start)
                _say(ranks, f"step {step}: validation loss {metrics['loss']:.3f}, masked-token accuracy "
                            f"{metrics['accuracy']:.1%}, perplexity {metrics['perplexity']:.1f}", bar)
                interval_start = time.perf_counter()  # evaluation time is not training throughput
            if step % cfg.save_every == 0 or final:
                if not _weights_finite(model):  # identical on every rank (DDP), so every rank stops here
                    raise _diverged(step, "a model weight", out_dir, cfg)
                rng_cpu = [torch.get_rng_state()]
                rng_cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
                if ranks.world_size > 1:
                    rng_cpu = [None] * ranks.world_size
                    dist.all_gather_object(rng_cpu, torch.get_rng_state())
                    if device.type == "cuda":
                        rng_cuda = [None] * ranks.world_size
                        dist.all_gather_object(rng_cuda, torch.cuda.get_rng_state(device))
                if ranks.main:
                    trainer_state = {"step": step, "data_position": stream.position,
                                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "scaler": scaler.state_dict(),
                                     "rng_cpu": rng_cpu, "rng_cuda": rng_cuda,
                                     "train_config": json.dumps(cfg.to_dict())}
                    where = ckpt.save_checkpoint(out_dir / "checkpoints", step, model, tokenizer, trainer_state,
                                                 keep=cfg.keep_checkpoints)
                    if final:
                        _say(ranks, f"checkpoint: {where}", bar)
                ranks.barrier()
    wall = time.perf_counter() - run_start
    summary = {"step": step, "final_train_loss": last_loss, "valid": metrics, "wall_s": wall,
               "tokens_per_s": run_tokens / wall if wall > 0 else 0.0, "packing_efficiency": stream.efficiency,
               "checkpoint": str(ckpt.latest_checkpoint(out_dir / "checkpoints")), "device": str(device),
               "world_size": ranks.world_size, "rank": ranks.rank}
    if ranks.main:
        ckpt.write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
