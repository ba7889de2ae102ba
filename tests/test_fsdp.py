"""FSDP2 training (fastmlm/distributed.py wrap_model) and its sharded checkpoints (fastmlm/sharded_checkpoint.py),
on 2 CPU processes with gloo."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlm import checkpoint as ckpt
from fastmlm import shards, train
from fastmlm.config import train_preset
from fastmlm.model import FastMLMForMaskedLM
from fastmlm.sharded_checkpoint import is_sharded_checkpoint, load_sharded
from fastmlm.tokenizer import load_tokenizer
from mlm_corpus import corpus, one_thread  # noqa: F401 (corpus: a fixture)

ROOT = Path(__file__).resolve().parents[1]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
STEPS = 20

# Under torchrun. "first": the whole FSDP run, then the same run (with activation checkpointing, which must not
# change a loss) killed with SIGKILL on both ranks in step 13, after its checkpoint at step 10. "resume": that run
# resumed from its sharded checkpoint. (Two runs in one launch: starting processes is the slow part on a CPU.)
WORKER = r"""
import json, os, signal, sys
from fastmlm import train
from fastmlm.config import train_preset
mode, settings, whole, killed = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
if mode == "first":
    train.train(train_preset("tiny", **settings, out_dir=whole))
    real, steps = train.accumulate_gradients, []
    def dying(*args, **kwargs):
        steps.append(1)
        if len(steps) == 13:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup, no checkpoint
        return real(*args, **kwargs)
    train.accumulate_gradients = dying
    train.train(train_preset("tiny", **settings, out_dir=killed, activation_checkpointing=True))
else:
    train.train(train_preset("tiny", **settings, out_dir=killed), resume="latest")
"""


def _settings(data_dir, **overrides):
    return {"data": [str(data_dir)], "valid_holdout": 0.0, "tokenizer": None, "max_steps": STEPS,
            "save_every": 10, "eval_every": STEPS, "log_every": 1, "keep_checkpoints": 3, "progress": False,
            "device": "cpu", "model_overrides": {"hidden_dropout": 0.0},  # no dropout: each rank draws its own
            **overrides}


def _losses(run) -> dict:
    with open(Path(run) / "log.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"}


@pytest.fixture(scope="module")
def fsdp_runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    shards.prepare([corpus / "train.txt"], load_tokenizer(corpus / "tokenizer.json"), root / "shards", progress=False)
    (root / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def launch(mode):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                               str(root / "worker.py"), mode, json.dumps(_settings(root / "shards", fsdp=True)),
                               str(root / "whole"), str(root / "resumed")], env=env, capture_output=True, text=True,
                              timeout=300)

    first = launch("first")
    output = first.stdout[-3000:] + first.stderr[-3000:]
    assert (root / "whole" / "summary.json").exists(), output
    assert first.returncode != 0 and "SIGKILL" in output, output  # the second run was killed
    assert ckpt.latest_checkpoint(root / "resumed" / "checkpoints").name == "step_00000010"
    assert max(_losses(root / "resumed")) >= 12  # it logged steps its checkpoint does not hold
    resumed = launch("resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return root


def test_fsdp_losses_equal_one_process_with_the_same_global_batch(fsdp_runs):
    """2 ranks x 8 rows (FSDP) against 1 process x 2 micro-batches of 8 rows: the same rows, masks and losses."""
    single = fsdp_runs / "single"
    train.train(train_preset("tiny", **_settings(fsdp_runs / "shards", grad_accum=2), out_dir=str(single)))
    fsdp, one = _losses(fsdp_runs / "whole"), _losses(single)
    assert sorted(fsdp) == list(range(1, STEPS + 1)) and sorted(one) == sorted(fsdp)
    for step in fsdp:
        assert fsdp[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), step
    assert fsdp[STEPS] < fsdp[1] - 0.5  # it learns
    summary = json.loads((fsdp_runs / "whole" / "summary.json").read_text())
    assert summary["world_size"] == 2 and is_sharded_checkpoint(summary["checkpoint"])
    ckpt.verify_checkpoint(summary["checkpoint"])  # the manifest covers the shard files too
    assert any(name.startswith("dcp/") for name in json.loads(
        (Path(summary["checkpoint"]) / ckpt.MANIFEST).read_text())["sha256"])


def test_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(fsdp_runs):
    """Steps 1-12 with FSDP + activation checkpointing, killed (kill -9) in step 13; 11-20 resumed from the
    sharded checkpoint at step 10."""
    assert _losses(fsdp_runs / "resumed") == _losses(fsdp_runs / "whole")
    final = [ckpt.read_safetensors(fsdp_runs / run / "checkpoints" / f"step_{STEPS:08d}" / ckpt.WEIGHTS_NAME)
             for run in ("whole", "resumed")]
    for name, tensor in final[0].items():
        assert torch.equal(tensor, final[1][name]), name


def test_a_two_rank_checkpoint_loads_into_one_rank(fsdp_runs, tmp_path, capsys):
    run = tmp_path / "one_rank"
    shutil.copytree(fsdp_runs / "whole", run)
    (run / "checkpoints" / "latest").write_text("step_00000010\n")
    saved = ckpt.read_safetensors(run / "checkpoints" / "step_00000010" / ckpt.WEIGHTS_NAME)
    cfg = train_preset("tiny", **_settings(fsdp_runs / "shards", fsdp=True, stop_after=11), out_dir=str(run))
    out = train.train(cfg, resume=str(run / "checkpoints" / "step_00000010"))
    assert "saved with 2 ranks, now 1" in capsys.readouterr().out
    assert out["step"] == 11 and out["world_size"] == 1
    # what the resume loaded: the 2 ranks' shards, whole, into one plain model, and the optimizer's state
    model = FastMLMForMaskedLM(train.model_config(cfg, load_tokenizer(run / "checkpoints" / "step_00000010" /
                                                                      "tokenizer.json")))
    optimizer = train.make_optimizer(model, cfg)
    load_sharded(run / "checkpoints" / "step_00000010", model, optimizer)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert all(int(s["step"]) == 10 for s in optimizer.state_dict()["state"].values())
    # and a sharded checkpoint that is not there is a clear error
    shutil.rmtree(run / "checkpoints" / "step_00000010" / "dcp")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        train.train(cfg, resume=str(run / "checkpoints" / "step_00000010"))
