"""Run folders under faults: diverging losses, two processes on one folder, resume with changed
settings, finished runs, kills while logs are rewritten and leftovers of killed saves."""
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlm import checkpoint as ckpt
from fastmlm import run_dir, train
from fastmlm.config import resumed_config
from fastmlm.model import FastMLMForMaskedLM
import mlm_corpus
from mlm_corpus import corpus, one_thread  # noqa: F401 (corpus: a fixture)

ROOT = Path(__file__).resolve().parents[1]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def tiny(corpus, out_dir, **overrides):
    """A 2-layer, 32-wide model on the small corpus: a step takes milliseconds."""
    model = {"hidden_size": 32, "num_heads": 2, "hidden_dropout": 0.0}
    return mlm_corpus.tiny(corpus, out_dir, **{"model_overrides": model, **overrides})


def logged_steps(run_dir, split="train"):
    with open(Path(run_dir) / "log.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["split"] == split]


# --------------------------------------------------------------------------- NaN / inf
def _poison_weights_at(monkeypatch, bad_step):
    """Make the weights NaN just before step ``bad_step``'s forward, as a diverging run does."""
    calls = {"n": 0}
    real = train.accumulate_gradients

    def accumulate(net, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == bad_step:
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))
        return real(net, *args, **kwargs)

    monkeypatch.setattr(train, "accumulate_gradients", accumulate)


@pytest.mark.parametrize("log_every,message", [
    (1, "step 3: the training loss became NaN/inf"),
    (4, "step 3: the training loss became NaN/inf"),  # read at step 4, but step 3 is named
    (5, "step 4: a model weight became NaN/inf"),     # the save at step 4 comes before the log at 5
])
def test_divergence_stops_naming_the_step_and_keeps_the_finite_checkpoint(corpus, tmp_path, monkeypatch,
                                                                          log_every, message):
    _poison_weights_at(monkeypatch, 3)
    cfg = tiny(corpus, tmp_path, max_steps=8, save_every=2, log_every=log_every, eval_every=100)
    with pytest.raises(train.TrainingDiverged, match=message) as info:
        train.train(cfg)
    last = tmp_path / "checkpoints" / "step_00000002"
    assert str(last) in str(info.value) and "--lr" in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == last
    weights = FastMLMForMaskedLM.from_pretrained(last).state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights)
    assert not (tmp_path / "summary.json").exists()
    assert all(step < 3 for step in logged_steps(tmp_path))  # no NaN row
    run_dir.RunLock(tmp_path).acquire().release()  # the lock went with the error


def test_a_real_divergence_stops_the_run(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path, lr=1e30, warmup_steps=0, max_steps=6, save_every=2)
    with pytest.raises(train.TrainingDiverged, match="step 2: the training loss became NaN/inf.*no checkpoint"):
        train.train(cfg)
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []


def test_non_finite_settings_are_refused():
    for name in ("lr", "weight_decay", "clip_norm"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number .* got inf"):
            train.TrainConfig(**{name: math.inf}).validate()
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        train.TrainConfig(lr=math.nan).validate()


# --------------------------------------------------------------------------- the run lock
def test_a_locked_run_folder_is_refused_and_kept(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path, max_steps=2, save_every=2, eval_every=2)
    train.train(cfg)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with run_dir.RunLock(tmp_path):  # a live run (this process, through another open file)
        for kwargs in ({}, {"overwrite": True}, {"resume": "latest"}):
            with pytest.raises(run_dir.RunLockedError, match=f"in use by another fastmlm run \\(pid {os.getpid()}"):
                train.train(cfg, **kwargs)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    train.train(cfg, overwrite=True)  # free again


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_overwrite_with_bad_input_keeps_the_old_run(corpus, tmp_path):
    """--overwrite deletes the old run only once the new one is ready: a missing or empty --data, a bad
    --tokenizer or --set, or empty validation text is refused with every file of the old run kept
    (the old run's checkpoints and tokenizer were deleted before any of them was read)."""
    out = tmp_path / "run"
    train.train(tiny(corpus, out, max_steps=2, save_every=2, eval_every=2, tokenizer=None, vocab_size=300))
    before = _tree(out)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad_vocab.txt").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "special.txt").write_text("[CLS] [SEP] [MASK]\n")
    bad = [({"data": [str(tmp_path / "missing.txt")]}, "no such file or folder"),
           ({"data": [str(tmp_path / "empty.txt")], "tokenizer": None}, r"--data: \[.*empty.txt'\] holds no text"),
           ({"data": [str(tmp_path / "empty.txt")]}, r"--data: \[.*empty.txt'\] holds no text to train on"),
           ({"tokenizer": str(tmp_path / "bad_vocab.txt")}, "is not a UTF-8 text file"),
           ({"model_overrides": {"hidden_size": "wide"}}, "hidden_size must be a positive int"),
           ({"valid_data": [str(tmp_path / "empty.txt")]}, "holds no text"),
           # validated on nothing: every validation said "accuracy nan%, perplexity nan"
           ({"valid_data": [str(tmp_path / "special.txt")]}, r"the validation text \(.*special.txt.*\) has no token "
                                                             r"masked at --mask-rate 0.15")]
    for overrides, message in bad:
        with pytest.warns() if "empty.txt" in str(overrides) else contextlib.nullcontext():
            with pytest.raises((ValueError, FileNotFoundError), match=message):
                train.train(tiny(corpus, out, max_steps=2, **overrides), overwrite=True)
        assert _tree(out) == before, overrides
    train.train(tiny(corpus, out, max_steps=2, save_every=2, eval_every=2), overwrite=True)  # a good one replaces it
    assert not (out / "tokenizer.json").exists()  # the old run's: this one was given --tokenizer
    assert ckpt.list_checkpoints(out / "checkpoints")[-1].name == "step_00000002"


def test_one_document_of_data_says_it_was_held_out(tmp_path):
    """--data of one document: its held-out validation slice is all of it, and the error says so (it said
    "the documents hold no text to train a tokenizer on", of a file full of text)."""
    (tmp_path / "one.txt").write_text("a single long document of words " * 50)
    cfg = train.TrainConfig(data=[str(tmp_path / "one.txt")], out_dir=str(tmp_path / "run"), progress=False,
                            vocab_size=200)
    with pytest.raises(ValueError, match=r"--data: all but the held-out validation slice .* holds no text to train "
                                         r"on \(the first document of --data is always held out"):
        train.train(cfg)


def test_a_damaged_latest_checkpoint_names_the_one_to_resume_from(corpus, tmp_path):
    """The newest checkpoint damaged (a disk error): resume said only that it is corrupt; now it names the
    run's previous checkpoint and the flag, and resuming from it works."""
    cfg = tiny(corpus, tmp_path, max_steps=4, save_every=2, eval_every=4)
    train.train(cfg)
    weights = tmp_path / "checkpoints" / "step_00000004" / ckpt.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    previous = tmp_path / "checkpoints" / "step_00000002"
    with pytest.raises(ckpt.CheckpointError, match=f"is corrupt: .*; the run's previous checkpoint is {previous}: "
                                                   f"continue from it with --resume {previous}"):
        train.train(cfg, resume="latest")
    assert train.train(cfg, resume=str(previous))["step"] == 4


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = ("import sys, time; from fastmlm.run_dir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_dir.RunLockedError, match=f"pid {holder.pid}"):
            run_dir.RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up in the holder
        holder.wait()
    lock = run_dir.RunLock(tmp_path).acquire()
    assert (tmp_path / run_dir.LOCK).read_text().strip() == str(os.getpid())
    lock.release()


# --------------------------------------------------------------------------- resume
def test_resume_refuses_changed_settings_and_lists_them(corpus, tmp_path):
    saved = tiny(corpus, tmp_path, max_steps=4)
    with pytest.raises(ValueError) as info:
        resumed_config(saved, saved, {"lr": 0.5, "seq_len": 16, "max_steps": 9,
                                            "model_overrides": {"hidden_size": 64}})
    text = str(info.value)
    assert "--lr: the run has 0.002, asked 0.5" in text and "--seq-len: the run has 32, asked 16" in text
    assert "--set: the run has" in text and "--max-steps" not in text.split("only these")[0]
    assert "only these may change on resume: --max-steps, --stop-after" in text

    # the same values, lists for tuples, and single --set entries are no change; RESUMABLE ones take effect
    asked = {"betas": list(saved.betas), "seq_len": 32, "model_overrides": {"hidden_size": 32}, "max_steps": 9,
             "log_every": 3, "eval_every": 5, "save_every": 7, "progress": True}
    cfg = resumed_config(saved, saved, asked)
    assert (cfg.max_steps, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.progress) == (9, 3, 5, 7, True)
    assert cfg.model_overrides == saved.model_overrides
    with pytest.raises(ValueError, match="changes=.* resumed run"):
        train.train(saved, changes={"max_steps": 9})


def test_resume_extends_and_a_finished_run_is_left_alone(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path, max_steps=2, save_every=2, eval_every=2)
    train.train(cfg)
    files = {name: (tmp_path / name).read_bytes() for name in ("log.csv", "summary.json", "train_config.json")}
    again = train.train(cfg, resume="latest")
    assert "is finished (step 2 of max_steps 2)" in again["nothing_to_do"]
    assert again["valid"]["n_masked"] > 0 and math.isfinite(again["final_train_loss"])  # the run's own summary
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]

    longer = train.train(cfg, resume="latest", changes={"max_steps": 3})
    assert longer["step"] == 3 and logged_steps(tmp_path) == [1, 2, 3]
    assert json.loads((tmp_path / "train_config.json").read_text())["max_steps"] == 3
    state = ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert json.loads(state["train_config"])["max_steps"] == 3  # a later resume continues the longer run


# --------------------------------------------------------------------------- logs and leftovers
def test_log_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "log.csv"
    log.write_text("step,split,loss\n1,train,5.0\n2,train,4.0\n3,train,3.0\n")
    before = log.read_text()

    def killed(self, rows):
        raise KeyboardInterrupt  # as a kill in the middle of the rewrite

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dir.Logger(tmp_path, True, resume_step=2)
    assert log.read_text() == before


def test_a_rerun_after_a_kill_before_the_first_checkpoint_starts_a_fresh_log(corpus, tmp_path):
    (tmp_path / "train_config.json").write_text("{}")  # what the dead run wrote before its logger
    (tmp_path / "log.csv").write_text("step,split,loss\n1,train,9.0\n2,train,8.0\n")  # the dead run's rows
    (tmp_path / "summary.json").write_text("{}")
    train.train(tiny(corpus, tmp_path, max_steps=2, save_every=2, eval_every=2))
    assert logged_steps(tmp_path) == [1, 2]
    with open(tmp_path / "log.csv", newline="") as f:
        assert all(float(r["loss"]) < 8.0 for r in csv.DictReader(f) if r["split"] == "train")
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 2


def test_a_folder_no_run_made_keeps_its_files_of_the_logs_names(corpus, tmp_path):
    """--out-dir at a folder of the user's that holds a log.csv or a best/ (no run config, no checkpoints):
    a fresh run deleted them (start_fresh clears a dead run's logs); now it is refused, every file kept."""
    mine = {"log.csv": "my,own,table\n", "curves.png": "not a run's"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"--out-dir {tmp_path} holds log.csv, curves.png but is not a fastmlm "
                                         r"run folder \(no train_config.json\)"):
        train.train(tiny(corpus, tmp_path, max_steps=2))
    (tmp_path / "best").mkdir()
    with pytest.raises(ValueError, match=r"holds log.csv, curves.png, best but is not a fastmlm run folder \(no "
                                         r"finetune_config.json\)"):
        run_dir.refuse_existing_run(tmp_path, False, "finetune_config.json", (*run_dir.RUN_LOGS, "best"))
    assert {p.name for p in tmp_path.iterdir()} >= {*mine, "best"}
    assert all((tmp_path / name).read_text() == text for name, text in mine.items())


def test_a_model_folder_is_not_a_run_folder(corpus, tmp_path):
    """--out-dir at a saved model (save_pretrained / export-hf): a run wrote its own tokenizer.json over the
    model's, so the folder no longer loaded as the model it was; now refused, the folder untouched."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "tokenizer.json").write_text("the model's")
    with pytest.raises(ValueError, match=rf"--out-dir {model_dir} holds config.json: a model folder, not a run folder"):
        train.train(tiny(corpus, model_dir, max_steps=2))
    assert {p.name for p in model_dir.iterdir()} - {run_dir.LOCK} == {"config.json", "tokenizer.json"}
    assert (model_dir / "tokenizer.json").read_text() == "the model's"


def test_leftovers_of_killed_saves_are_removed_at_start(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path, max_steps=2, save_every=2, eval_every=2, stop_after=1)
    train.train(cfg)
    checkpoints = tmp_path / "checkpoints"
    leftovers = [checkpoints / ".step_00000002.tmp4000000", checkpoints / ".step_00000001.old77",
                 checkpoints / f".latest.tmp{os.getpid()}", tmp_path / ".log.csv.tmp12"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"half")
    leftovers[1].mkdir()
    for path in leftovers[2:]:
        path.write_text("half")
    train.train(tiny(corpus, tmp_path, max_steps=2, save_every=2, eval_every=2), resume="latest")
    assert not any(path.exists() for path in leftovers)
    assert (checkpoints / "step_00000002").is_dir() and (tmp_path / run_dir.LOCK).exists()
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []
