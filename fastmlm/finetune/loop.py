"""The fine-tuning loop: :func:`finetune`.

    --from RUN | CHECKPOINT | HF_DIR ─► encoder + tokenizer ─► SequenceClassifier / TokenClassifier
    task (bundled or JSONL) ─► tokenised train / valid rows; majority and bag-of-words baselines on the same split
    for each epoch: shuffled batches (seed + epoch), AdamW, linear warm-up then decay, grad clipping
        every log_every steps: the mean train loss (log.csv, progress bar or lines)
        at the end: validation metrics, checkpoint, best model to <run>/best/, curves.png
        early stop when the validation metric has not improved for ``patience`` epochs

The run folder is fastmlm.train's: its lock (fastmlm.run_dir), atomic checkpoints with the
optimizer, scheduler and RNG states (fastmlm.checkpoint), so ``resume`` continues from the
last finished epoch exactly (the same shuffles and dropout as an uninterrupted run). It also
holds ``best/`` (the model with the best validation metric: what ``export-hf`` exports),
``baselines.json`` and ``summary.json``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import run_dir
from ..distributed import Dist, resolve_device
from ..plot import PlotWarning
from ..predict import folder_tokenizer, is_hf_folder, load_checkpoint, resolve_checkpoint
from ..progress import Progress
from ..tokenizer import special_ids
from ..train import autocast, autocast_dtype, lr_factor, make_optimizer, optimizer_step
from . import baselines
from .config import CONFIG_FILE, RESUMABLE, FinetuneConfig
from .heads import HEADS, TaskModel, is_task_folder, read_task_file
from .metrics import PRIMARY, task_scores
from .tasks import Task, batches, encode, load_task, shared_inputs, task_digest

BEST = "best"
LOG_FIELDS = ("step", "epoch", "split", "loss", "metric", "lr", "elapsed_s")


# --------------------------------------------------------------------------- pieces
def source_folder(source) -> Path:
    """The model folder ``--from`` names (a run's latest checkpoint for a run); clear errors otherwise."""
    try:
        path = resolve_checkpoint(source)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"--from {source}: {exc} (expected a fastmlm run or checkpoint folder, or a "
                                   f"Hugging Face BERT folder)") from None
    if is_task_folder(path):
        raise ValueError(f"--from {source}: {path} is a fine-tuned model; start from the pretrained run or "
                         f"Hugging Face folder it came from")
    if not is_hf_folder(path) and not (path / ckpt.MANIFEST).is_file():  # checked in full (hashes) when loaded
        raise ckpt.CheckpointError(f"--from {source}: {path} is neither a fastmlm checkpoint or model folder (no "
                                   f"{ckpt.MANIFEST}) nor a Hugging Face BERT folder (no valid {ckpt.CONFIG_NAME} "
                                   f"naming a model_type)")
    return path


def _refuse_source_in_run(cfg: FinetuneConfig, source: Path) -> None:
    """ValueError when the --from model is the --out-dir folder or one of its checkpoints: the new run
    would delete it (--overwrite) or put its own checkpoints/ there, which --from, fill-mask and
    export-hf then read instead of the pretrained model."""
    out, src = Path(cfg.out_dir).resolve(), source.resolve()
    if src == out or out / "checkpoints" in src.parents:
        raise ValueError(f"--out-dir {cfg.out_dir} holds the --from model ({source}); a fine-tuning run there "
                         f"would replace or hide it: pick another --out-dir")


def load_encoder(source, device="cpu"):
    """(encoder, tokenizer) from a fastmlm run / checkpoint folder or a Hugging Face BERT folder."""
    path = source_folder(source)
    if not is_hf_folder(path):
        model, tokenizer = load_checkpoint(path, device)
    else:
        from ..hf import load_hf_encoder

        try:  # fastmlm.hf's messages ("cannot load this Hugging Face config: ...") do not name the flag
            tokenizer = folder_tokenizer(path, hf=True)  # before the weights, so a folder without one fails at once
            model = load_hf_encoder(path).to(device)
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"--from {source}: {exc}") from None
    # A tokenizer with more ids than the embedding has rows would stop the run at its first batch
    # (input_ids out of range), after the baselines; a smaller one is fine (vocabularies are often padded).
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ckpt.CheckpointError(f"--from {source}: the tokenizer in {path} has {tokenizer.get_vocab_size()} "
                                   f"tokens but the model's vocab_size is {model.config.vocab_size}; they must "
                                   "come from the same checkpoint")
    return model.train(), tokenizer


def training_slice(task: Task, cfg: FinetuneConfig) -> Task:
    """``task`` with at most ``max_train_examples`` training examples (a seeded random pick)."""
    if cfg.max_train_examples is None or cfg.max_train_examples >= len(task.train):
        return task
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(task.train))[:cfg.max_train_examples])
    return Task(task.name, task.kind, task.labels, [task.train[i] for i in pick], task.valid)


@torch.no_grad()
def predict(model: TaskModel, task: Task, encoded, device, batch_size: int, pad_id: int, amp_dtype=None):
    """(mean validation loss, predictions): class names per example, or a tag per word."""
    was_training = model.training
    model.eval()
    out, loss_sum, weight = [None] * len(encoded.ids), 0.0, 0
    for pick, ids, mask, labels in batches(encoded, batch_size, pad_id):
        with autocast(device, amp_dtype):
            result = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
                           labels=torch.from_numpy(labels).to(device))
        n = len(pick) if task.kind == "sequence" else int((labels != -100).sum())
        loss_sum, weight = loss_sum + float(result.loss) * n, weight + n
        best = result.logits.argmax(-1).cpu().numpy()
        for row, i in enumerate(pick):
            if task.kind == "sequence":
                out[i] = task.labels[best[row]]
            else:  # each word's tag is its first token's; a word cut off by max_len is "O"
                out[i] = [task.labels[best[row, p]] if p >= 0 else "O" for p in encoded.first[i]]
    model.train(was_training)
    return loss_sum / max(weight, 1), out


def gold(task: Task) -> list:
    return [y for _, y in task.valid]


class _Log:
    """log.csv of a fine-tuning run: train rows (loss, lr) and validation rows (loss, primary metric)."""

    def __init__(self, path: Path, resume_step: int = 0):
        rows = []
        if resume_step and path.exists():  # drop rows a killed run wrote after its checkpoint
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def log(self, **row):
        self.writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        self.file.flush()

    def close(self):
        self.file.close()


def write_curves(out_dir: Path, metric: str, baseline_scores: dict) -> None:
    """<run>/curves.png: train and validation loss by step; the validation metric beside the baselines."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        with open(out_dir / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        fig = Figure(figsize=(10, 4), layout="constrained")
        FigureCanvasAgg(fig)
        loss_ax, metric_ax = fig.subplots(1, 2)
        for split, style in (("train", "-"), ("valid", "o--")):
            picked = [r for r in rows if r["split"] == split]
            loss_ax.plot([int(r["step"]) for r in picked], [float(r["loss"]) for r in picked], style, label=split)
        valid = [r for r in rows if r["split"] == "valid"]
        metric_ax.plot([int(r["step"]) for r in valid], [float(r["metric"]) for r in valid], "o-", label="fine-tuned")
        for (name, scores), colour in zip(baseline_scores.items(), ("C1", "C2")):
            metric_ax.axhline(scores[metric], color=colour, ls=":", label=f"{name} baseline")
        loss_ax.set(title="cross-entropy", xlabel="step")
        metric_ax.set(title=f"validation {metric}", xlabel="step")
        for ax in (loss_ax, metric_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        tmp = out_dir / ".curves.tmp.png"
        fig.savefig(tmp, dpi=100)
        tmp.replace(out_dir / "curves.png")
    except ImportError:
        warnings.warn("matplotlib is not installed, so no curves.png is drawn", PlotWarning, stacklevel=2)
    except Exception as exc:  # a picture must never stop a run
        warnings.warn(f"could not draw {out_dir / 'curves.png'}: {type(exc).__name__}: {exc}", PlotWarning,
                      stacklevel=2)


# --------------------------------------------------------------------------- the loop
def finetune(cfg: FinetuneConfig, resume: bool = False, overwrite: bool = False,
             changes: Optional[dict] = None) -> dict:
    """Fine-tune (or, with ``resume``, continue the run in ``cfg.out_dir``); return the run's summary.

    On resume the saved config is used, with ``changes`` (RESUMABLE fields only: epochs,
    stop_after, patience, progress, device); ``cfg.task`` and ``cfg.init`` must be the run's.
    A fresh run refuses an ``out_dir`` holding a run unless ``overwrite``.
    """
    cfg.validate()
    if resume and overwrite:
        raise ValueError("resume continues the run in out_dir and overwrite deletes it; give one of them")
    refused = sorted(set(changes or {}) - set(RESUMABLE))
    if refused:
        raise ValueError(f"resume: {refused} cannot change on resume (only {list(RESUMABLE)} can)")
    resolve_device(cfg.device)
    source = source_folder(cfg.init)  # a wrong --from fails before the run folder is touched
    if not resume:
        _refuse_source_in_run(cfg, source)
    with run_dir.locked(cfg.out_dir):
        return _finetune_locked(cfg, resume, overwrite, changes or {})


def _open(cfg: FinetuneConfig, resume: bool, overwrite: bool, changes: dict):
    out_dir = Path(cfg.out_dir)
    if not resume:
        run_dir.start_fresh(out_dir, overwrite, Dist(), config_name=CONFIG_FILE,
                            logs=(*run_dir.RUN_LOGS, BEST, "baselines.json"))
        return cfg, None, None
    saved, last, state = run_dir.saved_run(out_dir, FinetuneConfig, flag="resume")
    for name in ("task", "init"):
        if getattr(cfg, name) != getattr(saved, name):
            raise ValueError(f"resume: the run in {out_dir} has {name}={getattr(saved, name)!r}, not "
                             f"{getattr(cfg, name)!r}")
    merged = {**saved.to_dict(), **changes, "out_dir": cfg.out_dir}
    return FinetuneConfig.from_dict(merged).validate(), last, state


def _inputs(cfg: FinetuneConfig, device):
    """(task, encoder, tokenizer): everything a bad --task or --from fails on."""
    task = training_slice(load_task(cfg.task, cfg.valid), cfg)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = load_encoder(cfg.init, device)
    if cfg.max_len > encoder.config.max_position_embeddings:
        raise ValueError(f"max_len {cfg.max_len} exceeds the model's max_position_embeddings "
                         f"{encoder.config.max_position_embeddings}")
    return task, encoder, tokenizer


def _finetune_locked(cfg: FinetuneConfig, resume: bool, overwrite: bool, changes: dict) -> dict:
    if resume:  # the saved settings first: they say what to load
        cfg, last, state = _open(cfg, resume, overwrite, changes)
    task, encoder, tokenizer = _inputs(cfg, resolve_device(cfg.device))
    digest = task_digest(task)  # kept in each checkpoint: a resumed run must train on the same examples
    if resume:
        _check_same_task(task, digest, cfg, last, state)
    if not resume:  # clears an earlier run in out_dir (all of it with overwrite): only once the inputs have loaded
        cfg, last, state = _open(cfg, resume, overwrite, changes)
    out_dir, device = Path(cfg.out_dir), resolve_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)  # written once the task and the model have loaded
    ckpt.write_text_atomic(out_dir / CONFIG_FILE, cfg.to_json())
    model = HEADS[task.kind](encoder, task.labels, cfg.classifier_dropout).to(device).train()
    if last is not None:
        model.load_state_dict(_weights(last), strict=True)
    pad = special_ids(tokenizer).pad
    train_rows, valid_rows = encode(tokenizer, task, task.train, cfg.max_len), encode(tokenizer, task, task.valid,
                                                                                      cfg.max_len)
    metric = PRIMARY[task.kind]
    shared = shared_inputs(task)
    if shared:  # a --valid file that repeats training examples: allowed (an overfitting check), never silently
        print(f"fastmlm finetune: warning: {shared} of the {len(task.valid)} validation examples have the input of "
              f"a training example, so the validation metrics (and best/, early stopping) overstate how well "
              f"the model does on new text", file=sys.stderr, flush=True)

    baseline_file = out_dir / "baselines.json"
    if baseline_file.is_file():
        baseline_scores = json.loads(baseline_file.read_text())
    else:
        print(f"fastmlm finetune: {task.describe()}; computing the baselines on this split ...", flush=True)
        baseline_scores = {"majority": baselines.majority(task), "bag-of-words": baselines.bag_of_words(task)}
        ckpt.write_text_atomic(baseline_file, json.dumps(baseline_scores, indent=2))

    amp_dtype = autocast_dtype(cfg, device)
    steps_per_epoch = math.ceil(len(train_rows.ids) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    schedule = SimpleNamespace(warmup_steps=max(1, round(cfg.warmup * total)), max_steps=total,
                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, epoch, history = 0, 0, []
    best, bad_epochs = -math.inf, 0
    if state is not None:
        ckpt.restore_trainer_state(state, optimizer, scheduler, scaler, device)
        step, epoch, history = state["step"], state["data_position"], json.loads(state["history"])
        best, bad_epochs = state["best"], state["bad_epochs"]
        if bad_epochs == 0:  # the checkpoint is the best epoch's model: a session stopped before best/ was
            _save_best(model, tokenizer, out_dir)  # written (or while it was) leaves it stale or missing
        if bad_epochs >= cfg.patience or epoch >= min(cfg.epochs, cfg.stop_after or cfg.epochs):
            print(f"fastmlm finetune: the run in {out_dir} is finished (epoch {epoch}); nothing to do")
            try:
                return json.loads((out_dir / "summary.json").read_text())
            except (OSError, ValueError):  # killed between its last checkpoint and its summary: written below
                pass  # (the loop below does not run: its condition is the one just tested)

    log = _Log(out_dir / "log.csv", resume_step=step)
    start = time.perf_counter()
    with Progress(total, step, enabled=cfg.progress) as progress:
        while epoch < min(cfg.epochs, cfg.stop_after or cfg.epochs) and bad_epochs < cfg.patience:
            order = np.random.default_rng(cfg.seed + 1000 * epoch).permutation(len(train_rows.ids))
            running, seen = torch.zeros((), dtype=torch.float64, device=device), 0  # since the last log row
            tokens, clock = 0, time.perf_counter()
            for number, (_, ids, mask, labels) in enumerate(batches(train_rows, cfg.batch_size, pad, order), 1):
                with autocast(device, amp_dtype):
                    loss = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
                                 labels=torch.from_numpy(labels).to(device)).loss
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                optimizer_step(model, optimizer, scheduler, scaler, cfg.clip_norm)  # clip_norm > 0 (validated)
                step, running, seen = step + 1, running + loss.detach().double(), seen + 1
                tokens += int(mask.sum())  # a host-side numpy count
                progress.update(step)
                if step % cfg.log_every == 0 or number == steps_per_epoch:
                    mean = float(running) / seen  # the one host sync of a log interval
                    if not math.isfinite(mean):
                        raise ValueError(f"step {step}: the training loss became NaN/inf; lower --lr "
                                         f"(it is {cfg.lr:g}) or raise --warmup")
                    lr = scheduler.get_last_lr()[0]
                    log.log(step=step, epoch=epoch + 1, split="train", loss=mean, lr=lr,
                            elapsed_s=time.perf_counter() - start)
                    progress.log(mean, lr, tokens / max(time.perf_counter() - clock, 1e-9))
                    running.zero_()
                    seen, tokens, clock = 0, 0, time.perf_counter()
            epoch += 1
            valid_loss, predicted = predict(model, task, valid_rows, device, cfg.batch_size, pad, amp_dtype)
            scores = task_scores(task.kind, gold(task), predicted)
            history.append({"epoch": epoch, "step": step, "valid_loss": valid_loss, **scores})
            log.log(step=step, epoch=epoch, split="valid", loss=valid_loss, metric=scores[metric],
                    elapsed_s=time.perf_counter() - start)
            improved = scores[metric] > best
            best, bad_epochs = (scores[metric], 0) if improved else (best, bad_epochs + 1)
            progress.write(f"epoch {epoch}: validation loss {valid_loss:.4f}, "
                           + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))
                           + (" (best so far)" if improved else f" (no gain for {bad_epochs} epoch(s))"))
            trainer_state = ckpt.capture_trainer_state(step, epoch, optimizer, scheduler, scaler, cfg.to_dict(),
                                                       device)
            trainer_state.update(best=best, bad_epochs=bad_epochs, history=json.dumps(history),
                                 task_digest=digest)
            ckpt.save_checkpoint(out_dir / "checkpoints", step, model, tokenizer, trainer_state, keep=1)
            if improved:  # after the checkpoint, so best/ never holds an epoch the run's history has not
                _save_best(model, tokenizer, out_dir)
            write_curves(out_dir, metric, baseline_scores)
    log.close()
    best_epoch = max(history, key=lambda h: h[metric])
    summary = {"task": task.name, "kind": task.kind, "metric": metric, "best_epoch": best_epoch,
               "baselines": baseline_scores, "epochs_run": epoch, "steps": step,
               "stopped_early": bad_epochs >= cfg.patience and epoch < cfg.epochs,
               "train_examples": len(task.train), "valid_examples": len(task.valid),
               "wall_s_this_session": time.perf_counter() - start, "best_model": str(out_dir / BEST),
               "history": history}
    ckpt.write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _save_best(model: TaskModel, tokenizer, out_dir: Path) -> None:
    """Write <run>/best/ in full beside it, then swap it in: a session stopped mid-save (Ctrl-C, a full
    disk) keeps the previous best model, never a half-written or deleted best/. The temporaries are
    named as fastmlm.checkpoint's, so run_dir.locked() clears those a killed run left."""
    tmp, old = out_dir / f".{BEST}.tmp{os.getpid()}", out_dir / f".{BEST}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save(str(tmp / "tokenizer.json"))
    if (out_dir / BEST).exists():
        os.replace(out_dir / BEST, old)
    os.replace(tmp, out_dir / BEST)
    shutil.rmtree(old, ignore_errors=True)


def _check_same_task(task: Task, digest: str, cfg: FinetuneConfig, last: Path, state: dict) -> None:
    """ValueError unless ``task`` is the one the run resumed from was trained on. A task file edited
    since would otherwise fail to load into the head (other labels: a size mismatch) or, with the same
    labels, be trained and validated on other examples than the run's epochs and baselines.json."""
    saved = read_task_file(last)
    where = cfg.task + (f" (with --valid {cfg.valid})" if cfg.valid else "")
    fix = "put the task file back as it was, or start a new run (another --out-dir, or --overwrite)"
    if (saved["kind"], saved["labels"]) != (task.kind, task.labels):
        raise ValueError(f"resume: the run in {cfg.out_dir} was trained on {saved['kind']} labels {saved['labels']}, "
                         f"but {where} now has {task.kind} labels {task.labels}; {fix}")
    if state.get("task_digest") not in (None, digest):  # None: a checkpoint from before the digest
        raise ValueError(f"resume: the examples of {where} are not the ones the run in {cfg.out_dir} was trained "
                         f"and validated on (the file changed since); {fix}")


def _weights(checkpoint_dir: Path) -> dict:
    return ckpt.read_safetensors(Path(checkpoint_dir) / ckpt.WEIGHTS_NAME)


def report(summary: dict) -> str:
    """The summary table: the fine-tuned model's best epoch beside the two baselines."""
    names = ("accuracy", "macro_f1") if summary["kind"] == "sequence" else ("precision", "recall", "f1")
    rows = [("fine-tuned (best epoch %d)" % summary["best_epoch"]["epoch"], summary["best_epoch"])]
    rows += [(f"{name} baseline", scores) for name, scores in summary["baselines"].items()]
    lines = [f"{summary['task']}: {summary['valid_examples']} validation examples, "
             f"{summary['train_examples']} training examples",
             f"  {'':28}" + "".join(f"{n:>11}" for n in names)]
    lines += [f"  {label:28}" + "".join(f"{scores[n]:11.4f}" for n in names) for label, scores in rows]
    return "\n".join(lines)
