"""The MLM training loop: one linear function, :func:`train`.

    tokenizer (trained or loaded) ─► model (preset + vocab) ─► fused AdamW + warm-up/decay schedule
    for each step:
        grad_accum micro-batches from the BatchStream (dynamic masking, packed rows)
        loss = Σ masked-token losses / (masked tokens in all micro-batches, all ranks)
        backward (DDP syncs on the last micro-batch), clip, step, schedule
        every log_every: CSV row + progress (a bar on a terminal, plain lines otherwise)
        every eval_every: validation accuracy/ppl, and curves.png redrawn (fastmlm.plot)
        every save_every: atomic checkpoint (fastmlm/checkpoint.py)

Data: the bundled corpus and its validation split by default; ``data`` with ``valid_data``;
or ``data`` alone, with a fixed held-out slice of it for validation (``valid_holdout``,
fastmlm.corpus_reader.split_holdout). ``data`` may be a shard folder (``fastmlm prepare-data``,
fastmlm.shards): then nothing is tokenised and a resume reads nothing before its position.
Batches are made ahead on a background thread (fastmlm.prefetch); fastmlm.run_data picks the
source. ``compile`` runs the training forward and backward under ``torch.compile``;
``activation_checkpointing`` recomputes each encoder layer in the backward (keeping the fused
attention's outputs); ``dry_run`` prints the memory plan (fastmlm.memory_plan) and returns.

``resume`` continues a stopped run exactly: the model, optimizer, scheduler, grad scaler,
every rank's RNG state and the data position come back from the checkpoint, so the
remaining steps see the same batches, masks and dropout as an uninterrupted run. Only the
RESUMABLE fields of the config (fastmlm.config) may change on resume; a finished run is left alone.
Moving the data stream to the saved position is a phase of its own before the loop (its
epoch is re-tokenised up to there; whole epochs are skipped), so the first steps' rate and
ETA count training only.

The run folder is locked while a run trains in it (fastmlm.run_dir.RunLock). A loss or
weight that becomes NaN/inf stops the run (TrainingDiverged, naming the step) without
writing it to a checkpoint; the check reads only what the loop reads anyway (the loss at
each log step, the weights once before each save).

Distributed data parallel (fastmlm.distributed): run under ``torchrun``; each rank reads
every ``world_size``-th document (from shards: every world_size-th batch of rows), and the
loss is normalised by the global masked-token count. Gloo on the CPU, NCCL on GPUs. With
``fsdp``, FSDP2 shards the model instead of DDP copying it, and checkpoints are sharded
(fastmlm.sharded_checkpoint), resumable on another number of ranks.

Elsewhere: the run folder (lock, fresh or resumed start, log.csv) in fastmlm.run_dir, the
running totals and console progress in fastmlm.progress, the trainer state a checkpoint holds in fastmlm.checkpoint, TrainConfig
(also importable from here) and its presets in fastmlm.config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt
from . import data, plot, run_dir
from .config import TrainConfig, preset  # fastmlm.train.TrainConfig is the README's name for it
from .corpus_reader import read_documents
from .distributed import Dist, launch_rank, no_sync, resolve_device, setup_distributed, wrap_model
from .model import FastMLMForMaskedLM
from .progress import Meter, Progress
from .run_data import UNIGRAM_DOCUMENTS, RunData  # noqa: F401 (UNIGRAM_DOCUMENTS: the demo reads it here)
from .sharded_checkpoint import is_sharded_checkpoint, load_sharded, save_sharded
from .tokenizer import special_ids


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
    n_tokens, pad = tokenizer.get_vocab_size(with_added_tokens=True), special_ids(tokenizer).pad
    model_cfg = sized_model_config(cfg, n_tokens, pad)
    # --set may make the vocabulary larger than the tokenizer's, not contradict it: the first step failed
    # deep in the model ("labels must be -100 or a token id in [0, 10)"), and another pad id trained silently
    if model_cfg.vocab_size < n_tokens:
        raise ValueError(f"--set vocab_size={model_cfg.vocab_size}: the tokenizer has {n_tokens} tokens, and the "
                         f"model's vocabulary must hold them all")
    if model_cfg.pad_token_id != pad:
        raise ValueError(f"--set pad_token_id={model_cfg.pad_token_id}: the tokenizer's [PAD] is token {pad}; "
                         f"leave pad_token_id out (it is taken from the tokenizer)")
    return model_cfg


def sized_model_config(cfg: TrainConfig, vocab_size: int, pad_token_id: int = 0):
    """:func:`model_config` for a vocabulary of ``vocab_size`` (the memory plan has no tokenizer at hand)."""
    model_cfg = preset(cfg.model, **{"vocab_size": vocab_size, "pad_token_id": pad_token_id,
                                     "max_position_embeddings": max(cfg.seq_len, 128), **cfg.model_overrides})
    if model_cfg.max_position_embeddings < cfg.seq_len:  # else refused at the first step, the run folder made
        raise ValueError(f"--set max_position_embeddings={model_cfg.max_position_embeddings} is less than --seq-len "
                         f"{cfg.seq_len}: every row needs a position embedding for each of its tokens")
    return model_cfg


def unigram_log_probs(counts) -> torch.Tensor:
    """(V,) fp32 add-one smoothed log-frequencies, centred (mean 0): the ``unigram_bias`` start of the
    MLM head's bias, with which the model's first predictions are the token frequencies.

    Why it helps: at a zero bias the first steps teach the model token frequencies through the
    decoder, which is the word-embedding matrix; that gradient moves every embedding along one
    shared direction (the masked positions' nearly constant hidden state), and embeddings that
    all point one way no longer tell the encoder which token it reads, so training sits on the
    unigram plateau. Starting at the frequencies, that gradient is about context from step one.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64) + 1.0
    logp = (counts / counts.sum()).log()
    return (logp - logp.mean()).float()


def optimizer_step(model: torch.nn.Module, optimizer, scheduler, scaler, clip_norm: float) -> None:
    """One optimizer step from the accumulated (scaled) gradients: unscale and clip the gradient
    norm to ``clip_norm`` (0: no clipping), step (the scaler skips a step with inf/NaN
    gradients), update the loss scale, advance the schedule."""
    if clip_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay); biases and LayerNorm weights (1-d parameters) are not decayed.

    PyTorch's fused AdamW where the parameters allow it (CPU or CUDA floating-point tensors): one
    kernel for all parameters instead of a Python loop over them, which took a fifth of a CPU
    training step of the demo model.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


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
        with contextlib.nullcontext() if last else no_sync(net):  # communicate on the last micro-batch only
            with autocast(device, amp_dtype):
                out = net(**batch.to(device, non_blocking=True).model_inputs(), loss_reduction="sum")
            loss = out.loss * scale.to(out.loss.dtype)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += out.loss.detach().double()
    return step_loss


def _say(ranks: Dist, msg: str, progress: Optional[Progress] = None):
    if ranks.main:
        (progress.write if progress is not None else print)(msg)


def _skip_to(batches, position: int, ranks: Dist):
    """The stream of a resumed run, moved to ``position`` before the loop (and its clocks) start.

    From text, getting there re-reads and re-tokenises the data since the start of the saved
    epoch (fastmlm.data.BatchStream); from shards it reads nothing before it. Done here, as a
    phase of its own that says what it does and how long it took, it no longer stalls the first
    step nor skews the first rate and ETA.
    """
    if not position:
        return batches
    how = ("re-reading and re-tokenising its epoch up to there" if batches.replays
           else "pretokenised shards: no replay")
    _say(ranks, f"resume: moving the training data to batch {position} ({how}) ...")
    start = time.perf_counter()
    first = next(batches)
    _say(ranks, f"resume: the data is at batch {position} after {time.perf_counter() - start:.1f} s")
    return itertools.chain([first], batches)


def _validate(model, valid, device, amp_dtype, ranks: Dist, step: int, logger, meter, progress, cfg) -> dict:
    """One validation: its metrics, logged and shown; TrainingDiverged when they are NaN/inf."""
    metrics = evaluate(model, valid, device, amp_dtype, ranks)
    if metrics["n_masked"] and not math.isfinite(metrics["loss"]):  # finite weights, NaN outputs
        raise _diverged(step, "the validation loss", Path(cfg.out_dir), cfg)
    logger.log(step=step, split="valid", loss=metrics["loss"], accuracy=metrics["accuracy"],
               perplexity=metrics["perplexity"], elapsed_s=meter.elapsed())
    _say(ranks, f"step {step}: validation loss {metrics['loss']:.3f}, masked-token accuracy "
                f"{metrics['accuracy']:.1%}, perplexity {metrics['perplexity']:.1f}", progress)
    return metrics


def _save(model, tokenizer, optimizer, scheduler, scaler, stream, step: int, final: bool, cfg, device,
          ranks: Dist, progress) -> None:
    """A checkpoint of the run at ``step`` (every rank takes part; rank 0 writes), after the weights'
    finiteness check."""
    out_dir = Path(cfg.out_dir)
    if not _weights_finite(model, ranks):  # agreed by all ranks, so every rank stops here
        raise _diverged(step, "a model weight", out_dir, cfg)
    trainer_state = ckpt.capture_trainer_state(step, stream.position, optimizer, scheduler, scaler, cfg.to_dict(),
                                               device, ranks.world_size, stream.epoch_batches,
                                               sharded=cfg.fsdp)  # every rank
    if cfg.fsdp:  # every rank writes its shard
        where = save_sharded(out_dir / "checkpoints", step, model, optimizer, tokenizer, trainer_state, ranks,
                             keep=cfg.keep_checkpoints)
        if final:
            _say(ranks, f"checkpoint: {where}", progress)
        return
    if ranks.main:
        where = ckpt.save_checkpoint(out_dir / "checkpoints", step, model, tokenizer, trainer_state,
                                     keep=cfg.keep_checkpoints)
        if final:
            _say(ranks, f"checkpoint: {where}", progress)
    ranks.barrier()


# --------------------------------------------------------------------------- stopping a diverged run
class TrainingDiverged(ValueError):
    """The loss or the weights became NaN/inf: the run stopped without saving them."""


def _diverged(step: int, what: str, out_dir: Path, cfg: TrainConfig) -> TrainingDiverged:
    last = ckpt.latest_checkpoint(out_dir / "checkpoints")
    kept = f"the last checkpoint, all finite, is {last}" if last else "no checkpoint was saved"
    return TrainingDiverged(f"step {step}: {what} became NaN/inf, so the run stopped without saving ({kept}); "
                            f"start again with a lower --lr (it is {cfg.lr:g}) or more --warmup-steps")


def _weights_finite(model, ranks: Dist = Dist()) -> bool:
    """Whether every parameter is finite on every rank (each checks its FSDP shard): one host sync, before
    each save only."""
    from torch.distributed.tensor import DTensor

    local = [(p.to_local() if isinstance(p, DTensor) else p).detach() for p in model.parameters()]  # FSDP: shards
    finite = torch.stack([t.isfinite().all() for t in local]).all().to(torch.float32).reshape(1)
    return bool(ranks.all_min(finite).item())


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: Optional[str] = None, overwrite: bool = False, *,
          changes: Optional[dict] = None) -> dict:
    """Train (or, with ``resume`` = a checkpoint folder or "latest", continue) a run; return a summary.

    On resume the saved TrainConfig is used, except ``stop_after``, ``progress`` and
    ``out_dir``, taken from ``cfg``, and ``changes`` (the fields the caller asks for; only
    RESUMABLE ones may differ from the run, see :func:`fastmlm.config.resumed_config`). A run
    already at its last step changes nothing and returns its summary with a ``nothing_to_do``
    message. A fresh run refuses an ``out_dir`` that already holds checkpoints unless
    ``overwrite`` (which deletes that run's checkpoints and logs).

    The run folder is locked for the whole run (rank 0 holds the lock): another process
    training into it is refused. A NaN/inf loss or weight stops the run with
    TrainingDiverged naming the step; no checkpoint with a non-finite value is written.
    """
    if changes and not resume:
        raise ValueError("train(changes=...) applies to a resumed run; for a new run put the values in cfg")
    cfg.validate()
    if cfg.dry_run:  # the memory plan only: nothing is read, written or trained
        from .memory_plan import dry_run

        if resume:  # the plan of the run being resumed (its settings and the changes asked), not the flags' preset
            cfg = run_dir.open_resumed(cfg, resume, changes)[0]
        plan = dry_run(cfg)
        return {"nothing_to_do": "dry run", "memory_plan": dataclasses.asdict(plan), "total_bytes": plan.total}
    resolve_device(cfg.device)  # a wrong device fails before the run folder is touched
    with run_dir.locked(cfg.out_dir, main=launch_rank() == 0):
        return _train_locked(cfg, resume, overwrite, changes)


def _train_locked(cfg: TrainConfig, resume: Optional[str], overwrite: bool, changes: Optional[dict]) -> dict:
    # ---- set-up: run folder, tokenizer, model, optimizer (restored on resume), data
    resume_from, state = None, None
    if resume:
        cfg, resume_from, state = run_dir.open_resumed(cfg, resume, changes)
    ranks, device = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    stop = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    if state is not None and state["step"] >= stop:
        return run_dir.nothing_to_do(cfg, state["step"], resume_from, ranks)
    if state is None:
        run_dir.refuse_existing_run(out_dir, overwrite)  # before anything is written into the folder
    # Everything that reads what the user gave (the data, the tokenizer, --set, the validation text) comes
    # before an earlier run's files are cleared (start_fresh, below), so that a mistake in it is refused
    # with that run intact: --overwrite deletes the old run only once the new one is ready to train.
    run_data = RunData(cfg)  # text or a shard folder
    if run_data.train_files is not None and next(read_documents(run_data.train_files), None) is None:
        # text is read as it streams: without this, a missing or empty --data (with --tokenizer) showed at step 1
        raise ValueError(run_dir.no_training_text(run_data.train_files))
    tokenizer = run_data.tokenizer(resume_from, ranks)

    # Model: identical initial weights on every rank, then a per-rank dropout stream.
    torch.manual_seed(cfg.seed)
    model_cfg = model_config(cfg, tokenizer)
    model = FastMLMForMaskedLM(model_cfg).to(device)
    if cfg.activation_checkpointing:  # the same gradients, less activation memory
        model.set_activation_checkpointing("selective")
    if cfg.unigram_bias and state is None:  # a resumed run loads its bias with the other weights
        counts = run_data.unigram_counts(tokenizer)
        with torch.no_grad():
            model.head.bias.copy_(unigram_log_probs(counts).to(device))
    torch.manual_seed(cfg.seed + 1000 * ranks.rank)
    amp_dtype = autocast_dtype(cfg, device)
    net = wrap_model(model, ranks, device, cfg.fsdp, amp_dtype)  # DDP, or FSDP2 sharding model in place
    optimizer = make_optimizer(model, cfg)  # after FSDP2 has made the parameters sharded DTensors
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, position = 0, 0
    if state is not None:
        if is_sharded_checkpoint(resume_from):  # an FSDP run's: any number of ranks
            load_sharded(resume_from, model, optimizer)
        else:
            model.load_weights(ckpt.read_safetensors(resume_from / ckpt.WEIGHTS_NAME))
        if not ckpt.restore_trainer_state(state, optimizer, scheduler, scaler, device, ranks.rank, ranks.world_size):
            _say(ranks, f"resume: saved with {len(state['rng_cpu'])} ranks, now {ranks.world_size}: "
                        f"dropout RNG reseeded")
        step, position = state["step"], state["data_position"]
    if cfg.compile:  # the training forward and backward; evaluation runs the plain model
        net = torch.compile(net)

    collator = data.MaskingCollator(tokenizer, cfg.seq_len, cfg.batch_size, cfg.mask_rate, cfg.whole_word, cfg.layout)
    stream = run_data.stream(tokenizer, collator, ranks, position,  # made ahead on a background thread
                             ckpt.saved_epoch_batches(state, ranks.rank, ranks.world_size) if state is not None
                             else None)
    valid = run_data.validation(tokenizer, collator, ranks)
    # Else every validation reports NaN accuracy and perplexity. Counted over all ranks (each holds a slice),
    # so that every rank stops here, not one while the others wait for it at a collective.
    batches, masked = ranks.all_sum(torch.tensor([float(len(valid)), float(sum(b.n_masked for b in valid))],
                                                 dtype=torch.float64, device=device)).tolist()
    if batches and not masked:
        raise ValueError(f"the validation text ({run_data.describe_validation() or run_data.valid_files}) has no "
                         f"token masked at --mask-rate {cfg.mask_rate:g}: too little text to validate on; give "
                         f"more --valid-data, or no validation (--valid-holdout 0 with --data alone)")
    if state is None:  # the tokenizer.json a run trains on text (RunData.tokenizer) is this run's, not the old one's
        trained_tokenizer = not cfg.tokenizer and run_data.shards is None
        run_dir.start_fresh(out_dir, overwrite, ranks, keep=("tokenizer.json",) if trained_tokenizer else ())
    run_dir.write_config(cfg, ranks)
    logger = run_dir.Logger(out_dir, ranks.main, resume_step=step)
    n_params = sum(p.numel() for p in model.parameters())
    _say(ranks, f"fastmlm train: {cfg.model} model ({n_params / 1e6:.1f}M parameters, vocab "
                f"{model_cfg.vocab_size}) on {device}{f' x{ranks.world_size}' if ranks.world_size > 1 else ''}, "
                f"precision {amp_dtype or torch.float32}, {cfg.max_steps} steps of {cfg.grad_accum} x "
                f"{cfg.batch_size} x {cfg.seq_len} tokens" + (f", resumed at step {step}" if step else "")
                + (", torch.compile" if cfg.compile else "")
                + (", activation checkpointing" if cfg.activation_checkpointing else "")
                + (", FSDP" if cfg.fsdp else ""))
    if run_data.describe_validation():
        _say(ranks, f"validation: {run_data.describe_validation()} ({sum(b.n_masked for b in valid)} masked tokens)")
    batches = _skip_to(iter(stream), position, ranks)  # a resumed run's data replay, timed as its own phase

    model.train()
    meter = Meter(device)
    metrics: dict = {}
    progress = Progress(cfg.max_steps, step, enabled=cfg.progress and ranks.main)
    # ---- the loop: one optimizer step, then a log row, a validation, a checkpoint when due
    with logger, progress, stream:  # closed however the loop ends (an error, Ctrl-C)
        while step < stop:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            step_loss = accumulate_gradients(net, micro, device, amp_dtype, scaler, ranks)
            optimizer_step(model, optimizer, scheduler, scaler, cfg.clip_norm)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            meter.add(step, step_loss, micro)
            progress.update(step)

            final = step == stop
            if step % cfg.log_every == 0 or final:
                loss, tokens_per_s = meter.interval(ranks)
                if loss is not None and not math.isfinite(loss):  # None: nothing was masked since the last row
                    raise _diverged(min(step, int(ranks.all_min(meter.first_bad))), "the training loss", out_dir, cfg)
                lr = scheduler.get_last_lr()[0]
                progress.log(loss, lr, tokens_per_s)
                logger.log(step=step, split="train", loss=loss, lr=lr, tokens_per_s=tokens_per_s,
                           packing_efficiency=stream.efficiency, elapsed_s=meter.elapsed())
                meter.restart_clock()
            due = step % cfg.eval_every == 0 or step == cfg.max_steps
            with meter.paused():  # evaluating, drawing and saving are not training throughput
                if valid and due:
                    metrics = _validate(model, valid, device, amp_dtype, ranks, step, logger, meter, progress, cfg)
                if (due or final) and ranks.main:
                    plot.write_curves(out_dir, title=f"{out_dir.name}: step {step} of {cfg.max_steps}")
                if step % cfg.save_every == 0 or final:
                    _save(model, tokenizer, optimizer, scheduler, scaler, stream, step, final, cfg, device, ranks,
                          progress)
    # ---- finish: the summary
    wall = meter.elapsed()
    summary = {"step": step, "final_train_loss": meter.last_loss, "valid": metrics, "wall_s": wall,
               "tokens_per_s": meter.run_tokens / wall if wall > 0 else 0.0, "packing_efficiency": stream.efficiency,
               "checkpoint": str(ckpt.latest_checkpoint(out_dir / "checkpoints")), "device": str(device),
               "world_size": ranks.world_size, "rank": ranks.rank}
    if ranks.main:
        ckpt.write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
