"""The training loop (fastmlm/train.py) and its checkpoints (fastmlm/checkpoint.py), on tiny configs."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmlm import checkpoint as ckpt
from fastmlm import data, train
from fastmlm.config import preset, train_preset
from fastmlm.corpus_reader import read_documents
from fastmlm.model import FastMLMForMaskedLM
from fastmlm.tokenizer import load_tokenizer
from mlm_corpus import corpus, one_thread, tiny  # noqa: F401 (corpus: a fixture)

ROOT = Path(__file__).resolve().parents[1]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)




def train_losses(run_dir):
    """{step: loss} of the train rows of log.csv; fails on a repeated step."""
    with open(Path(run_dir) / "log.csv", newline="") as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["split"] == "train"]
    assert len({step for step, _ in rows}) == len(rows), f"repeated steps in log.csv: {rows}"
    return dict(rows)


# --------------------------------------------------------------------------- schedule and optimizer
def test_lr_schedule_warmup_then_decay():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="linear", min_lr_ratio=0.1)
    factors = [train.lr_factor(s, cfg) for s in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[9] == pytest.approx(0.1 + 0.9 * 0.5) and factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    cos = train.TrainConfig(warmup_steps=0, max_steps=10, schedule="cosine")
    assert train.lr_factor(0, cos) == 1.0 and train.lr_factor(5, cos) == pytest.approx(0.5)
    assert train.lr_factor(10, cos) == pytest.approx(0.0)


def test_adamw_decays_matrices_only():
    model = FastMLMForMaskedLM(preset("tiny"))
    opt = train.make_optimizer(model, train.TrainConfig(weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.AdamW)


def test_config_errors():
    with pytest.raises(ValueError, match="mask_rate"):
        train.TrainConfig(mask_rate=1.5).validate()
    with pytest.raises(ValueError, match="schedule"):
        train.TrainConfig(schedule="step").validate()
    with pytest.raises(ValueError, match="unknown training preset"):
        train_preset("huge")
    with pytest.raises(ValueError, match="unknown fields"):
        train.TrainConfig.from_dict({"learning_rate": 1})


# --------------------------------------------------------------------------- gradient accumulation
def test_accumulation_normalises_by_all_masked_tokens(corpus):
    """Two micro-batches with different masked counts give the gradient of their union's mean loss."""
    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    model = FastMLMForMaskedLM(preset("tiny", vocab_size=400, hidden_dropout=0.0))
    rows = list(data.iter_rows(read_documents([corpus / "train.txt"]), tokenizer, 32))
    big = data.MaskingCollator(tokenizer, 32, 4, mask_rate=0.3)(rows[:4], np.random.default_rng(0))
    small = data.MaskingCollator(tokenizer, 32, 4, mask_rate=0.1)(rows[4:8], np.random.default_rng(1))
    assert big.n_masked > 2 * small.n_masked > 0

    step_loss = train.accumulate_gradients(model, [big, small], torch.device("cpu"))
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sums = [model(**b.model_inputs(), loss_reduction="sum").loss for b in (big, small)]
    ((sums[0] + sums[1]) / (big.n_masked + small.n_masked)).backward()
    for got, want in zip(accumulated, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert step_loss.item() == pytest.approx(float(sums[0].detach() + sums[1].detach()), rel=1e-6)
    # averaging the two micro-batch means would weight the small batch's tokens more: a different gradient
    model.zero_grad()
    sums = [model(**b.model_inputs(), loss_reduction="sum").loss for b in (big, small)]
    ((sums[0] / big.n_masked + sums[1] / small.n_masked) / 2).backward()
    assert not torch.allclose(accumulated[0], model.embeddings.word.weight.grad, rtol=1e-3)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_corruption(corpus, tmp_path):
    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    model = FastMLMForMaskedLM(preset("tiny", vocab_size=400))
    opt = train.make_optimizer(model, train.TrainConfig())
    model(torch.randint(5, 400, (2, 8)), labels=torch.randint(5, 400, (2, 8))).loss.backward()
    opt.step()
    state = {"step": 3, "data_position": 7, "optimizer": opt.state_dict(), "rng_cpu": [torch.get_rng_state()]}
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        path = ckpt.save_checkpoint(root, step, model, tokenizer, state, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(root) == path
    (root / ".step_00000004.tmp999").mkdir()  # a save killed half way is invisible
    assert ckpt.latest_checkpoint(root) == path

    loaded = ckpt.load_trainer_state(path)
    assert loaded["step"] == 3 and loaded["data_position"] == 7
    assert torch.equal(loaded["rng_cpu"][0], state["rng_cpu"][0])
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], exp_avg)
    again = FastMLMForMaskedLM.from_pretrained(path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name

    # corruption: one flipped byte, a missing file, no manifest
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ckpt.CheckpointError, match="corrupt: model.safetensors"):
        ckpt.load_trainer_state(path)
    weights.write_bytes(good)
    ckpt.verify_checkpoint(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.json is missing"):
        ckpt.verify_checkpoint(path)
    (path / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        ckpt.verify_checkpoint(path)


def test_truncated_weights_are_a_clear_error(corpus, tmp_path):
    from fastmlm.predict import load_checkpoint

    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    path = ckpt.save_checkpoint(tmp_path, 1, FastMLMForMaskedLM(preset("tiny", vocab_size=400)), tokenizer, {})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="does not match its sha256"):
        load_checkpoint(path)
    (path / ckpt.MANIFEST).unlink()  # a folder without its manifest is refused...
    with pytest.raises(ckpt.CheckpointError, match="manifest"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="not a valid safetensors file"):  # ...and the header check still catches it
        FastMLMForMaskedLM.from_pretrained(path)


def test_unreadable_trainer_state_and_wrongly_typed_config_are_named(corpus, tmp_path):
    """A trainer_state.pt that is not one (its manifest rewritten to match) is a one-line error, not torch's
    page suggesting weights_only=False; a model folder has no trainer state to resume; a config.json field
    of the wrong type names the file (it said only "ModelConfig: hidden_size must be a positive int")."""
    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    model = FastMLMForMaskedLM(preset("tiny", vocab_size=400))
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, model, tokenizer, {"step": 1})
    (path / ckpt.STATE).write_bytes(b"garbage")
    ckpt.write_manifest(path, [ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME, "tokenizer.json", ckpt.STATE], step=1)
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.pt: not a trainer state fastmlm saved, or "
                                                   r"corrupt \(UnpicklingError\)$"):
        ckpt.load_trainer_state(path)
    folder = model.save_pretrained(tmp_path / "model")
    with pytest.raises(ckpt.CheckpointError, match="holds no trainer_state.pt: a model folder, not a training"):
        ckpt.load_trainer_state(folder)
    config = json.loads((folder / ckpt.CONFIG_NAME).read_text())
    (folder / ckpt.CONFIG_NAME).write_text(json.dumps({**config, "hidden_size": "64"}))
    with pytest.raises(ValueError, match=r"model/config.json: ModelConfig: hidden_size must be a positive int, "
                                         r"got '64'"):
        FastMLMForMaskedLM.from_pretrained(folder)


@pytest.mark.parametrize("overrides,message", [
    ({"vocab_size": 10}, r"--set vocab_size=10: the tokenizer has 400 tokens"),  # a traceback at step 1
    ({"max_position_embeddings": 16}, "--set max_position_embeddings=16 is less than --seq-len 32"),  # ditto
    ({"pad_token_id": 3}, r"--set pad_token_id=3: the tokenizer's \[PAD\] is token 0"),  # trained silently
])
def test_model_overrides_that_contradict_the_tokenizer_or_rows_are_refused(corpus, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train(tiny(corpus, tmp_path, max_steps=1, model_overrides=overrides))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "log.csv").exists()


# --------------------------------------------------------------------------- runs
def test_tiny_run_learns_logs_and_resumes_exactly(corpus, tmp_path):
    """An uninterrupted run vs. one stopped at step 5 and resumed: identical losses after the stop."""
    full = train.train(tiny(corpus, tmp_path / "full", max_steps=10, eval_every=5, save_every=5))
    losses = train_losses(tmp_path / "full")
    assert sorted(losses) == list(range(1, 11)) and all(math.isfinite(v) for v in losses.values())
    assert np.mean([losses[s] for s in (8, 9, 10)]) < np.mean([losses[s] for s in (1, 2, 3)])  # it learns
    assert full["valid"]["n_masked"] > 0 and 0 <= full["valid"]["accuracy"] <= 1
    assert 0.99 <= full["packing_efficiency"] <= 1.0

    stopped = train.train(tiny(corpus, tmp_path / "resumed", max_steps=10, eval_every=5, save_every=5, stop_after=5))
    assert stopped["step"] == 5 and Path(stopped["checkpoint"]).name == "step_00000005"
    with open(tmp_path / "resumed" / "log.csv", "a") as f:  # as if killed at step 6, after the checkpoint
        f.write("6,train,99.0,,,,,,\n")
    with pytest.raises(ValueError, match="already holds a run"):
        train.train(tiny(corpus, tmp_path / "resumed", max_steps=10))
    resumed = train.train(tiny(corpus, tmp_path / "resumed"), resume="latest")
    assert resumed["step"] == 10
    after = train_losses(tmp_path / "resumed")
    assert sorted(after) == list(range(1, 11))  # the killed run's row 6 was dropped
    for step in range(1, 11):
        assert after[step] == pytest.approx(losses[step], abs=1e-6, rel=0), step
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], abs=1e-6, rel=0)
    assert resumed["valid"]["loss"] == pytest.approx(full["valid"]["loss"], abs=1e-6, rel=0)

    # resuming from a corrupt checkpoint fails loudly
    latest = ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints")
    (latest / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="corrupt: trainer_state.pt"):
        train.train(tiny(corpus, tmp_path / "resumed"), resume="latest")


def test_grad_accum_packed_layout_and_whole_word_run(corpus, tmp_path):
    out = train.train(tiny(corpus, tmp_path / "run", max_steps=3, grad_accum=2, layout="packed", whole_word=True,
                           mask_rate=0.3, schedule="cosine", eval_every=3, save_every=3))
    assert out["step"] == 3 and math.isfinite(out["final_train_loss"]) and out["valid"]["n_masked"] > 0


def test_bf16_autocast_on_cpu(corpus, tmp_path):
    out = train.train(tiny(corpus, tmp_path / "run", max_steps=2, precision="bf16", eval_every=2, save_every=2))
    assert math.isfinite(out["final_train_loss"]) and math.isfinite(out["valid"]["loss"])


def test_ddp_two_cpu_processes_gloo(corpus, tmp_path):
    """torchrun with 2 CPU processes on gloo: both ranks step in lockstep, rank 0 checkpoints."""
    args = ["--preset", "tiny", "--data", str(corpus / "train.txt"), "--valid-data", str(corpus / "valid.txt"),
            "--tokenizer", str(corpus / "tokenizer.json"), "--out-dir", str(tmp_path / "ddp"), "--max-steps", "3",
            "--eval-every", "3", "--save-every", "3", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "fastmlm", "train", *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3 and math.isfinite(summary["final_train_loss"])
    state = ckpt.load_trainer_state(Path(summary["checkpoint"]))
    assert len(state["rng_cpu"]) == 2 and not torch.equal(state["rng_cpu"][0], state["rng_cpu"][1])


# --------------------------------------------------------------------------- the demo recipe's pieces (issue 17)
def test_unigram_bias_starts_the_model_at_the_token_frequencies(corpus, tmp_path):
    counts = np.array([0, 0, 3, 1, 7])
    start = train.unigram_log_probs(counts)
    assert float(start.mean()) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(start.double().softmax(0), torch.tensor((counts + 1) / (counts + 1).sum()))

    first_losses = {}
    for flag in (False, True):
        out = tmp_path / f"bias_{flag}"
        train.train(tiny(corpus, out, max_steps=2, unigram_bias=flag, eval_every=2, save_every=2, log_every=1))
        first_losses[flag] = train_losses(out)[1]
    assert first_losses[True] < first_losses[False] - 0.3  # no steps spent learning frequencies
    from fastmlm.predict import load_checkpoint

    model, tokenizer = load_checkpoint(tmp_path / "bias_True")
    the = tokenizer.token_to_id("the")
    assert int(model.head.bias.argmax()) in (the, tokenizer.token_to_id("."), tokenizer.token_to_id(","))


def test_fused_adamw_is_used_on_the_cpu():
    opt = train.make_optimizer(FastMLMForMaskedLM(preset("tiny")), train.TrainConfig())
    assert opt.defaults.get("fused") is True


# --------------------------------------------------------------------------- activation checkpointing (issue 19)
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_the_attention(monkeypatch):
    """Selective checkpointing recomputes the layers but not the fused attention (its forward runs once per
    layer, as without checkpointing; full checkpointing runs it twice); dropout and every gradient are the same."""
    import importlib

    attention, block_sparse = (importlib.import_module(f"fastmlm.ops.{op}") for op in ("attention", "block_sparse"))
    torch.manual_seed(0)
    model = FastMLMForMaskedLM(preset("tiny", hidden_dropout=0.1, attention_pattern=("dense", "window:3"),
                                      block_size=16))
    ids = torch.randint(5, 512, (3, 37))
    labels = torch.where(torch.rand(3, 37) < 0.3, ids, -100)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 29:] = False
    labels[1, 29:] = -100
    calls = []
    for registry in (attention.REGISTRY, block_sparse.REGISTRY):  # the backends auto picks on the CPU
        module = registry.module("torch")
        monkeypatch.setattr(module, "forward", lambda *a, _f=module.forward, **k: calls.append(1) or _f(*a, **k))
    grads, counts = {}, {}
    for mode in (None, "selective", "full"):
        model.set_activation_checkpointing(mode)
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the same dropout draws
        model(ids[:, 1:].transpose(0, 1).t(), attention_mask=mask[:, 1:], labels=labels[:, 1:]).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        counts[mode] = len(calls)
    assert counts == {None: 2, "selective": 2, "full": 4}
    for mode in ("selective", "full"):
        for name, grad in grads[None].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=0, atol=1e-7, msg=f"{mode}: {name}")
    with pytest.raises(ValueError, match="'selective' or 'full', got 'some'"):
        model.set_activation_checkpointing("some")


def test_activation_checkpointing_run_has_the_same_losses(corpus, tmp_path, capsys):
    runs = {flag: tmp_path / f"ac_{flag}" for flag in (False, True)}
    for flag, out in runs.items():
        train.train(tiny(corpus, out, max_steps=3, eval_every=3, save_every=3, log_every=1,
                         activation_checkpointing=flag))
        assert ("activation checkpointing" in capsys.readouterr().out) == flag
    losses = {flag: train_losses(out) for flag, out in runs.items()}
    assert len(losses[True]) == 3
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=1e-6)


def test_a_log_interval_without_a_masked_token_has_no_loss_not_zero(capsys):
    """A tiny corpus at a low mask rate can give steps with no masked token: their log rows said loss 0.0
    (and the summary "final train loss 0.0000"). Now the row has no loss, the line shows "-", and the
    last measured loss stays the run's."""
    from fastmlm.distributed import Dist
    from fastmlm.progress import Meter, Progress

    meter = Meter(torch.device("cpu"))
    measured = data.Batch(torch.zeros(4, dtype=torch.long), None, None, n_masked=2, n_tokens=4)
    unmasked = data.Batch(torch.zeros(4, dtype=torch.long), None, None, n_masked=0, n_tokens=4)
    meter.add(1, torch.tensor(3.0, dtype=torch.float64), [measured])
    assert meter.interval(Dist())[0] == 1.5
    meter.add(2, torch.tensor(0.0, dtype=torch.float64), [unmasked])
    loss, tokens_per_s = meter.interval(Dist())
    assert loss is None and tokens_per_s > 0 and meter.last_loss == 1.5
    progress = Progress(10, 2, enabled=True, mode="lines")
    progress.step = 2
    progress.log(loss, 1e-3, tokens_per_s)
    assert "| loss - |" in capsys.readouterr().out


def test_a_damaged_latest_pointer_falls_back_to_the_newest_checkpoint(corpus, tmp_path):
    """checkpoints/latest holding bytes that are not UTF-8 stopped resume and eval with "'utf-8' codec can't
    decode byte 0xff", naming no file; one naming another run's checkpoint ("../../other/...") was followed."""
    tokenizer = load_tokenizer(corpus / "tokenizer.json")
    model = FastMLMForMaskedLM(preset("tiny", vocab_size=400))
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        newest = ckpt.save_checkpoint(root, step, model, tokenizer, {}, keep=2)
    other = ckpt.save_checkpoint(tmp_path / "other" / "checkpoints", 7, model, tokenizer, {})
    for pointer in (b"\xff\xfe\x00", b"step_0000\x00", b"../../other/checkpoints/" + other.name.encode(), b""):
        (root / ckpt.LATEST).write_bytes(pointer)
        assert ckpt.latest_checkpoint(root) == newest, pointer
    (root / ckpt.LATEST).write_text("step_00000001\n")  # a good pointer still names the checkpoint
    assert ckpt.latest_checkpoint(root) == root / "step_00000001"
