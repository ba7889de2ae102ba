"""The memory plan of ``fastmlm train --dry-run`` (fastmlm/memory_plan.py)."""
import pytest

from fastmlm import cli, memory_plan
from fastmlm.config import train_preset
from fastmlm.model import FastMLMForMaskedLM
from fastmlm.train import sized_model_config
from mlm_corpus import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _cfg(**overrides):
    # 3 layers and rows of 96 tokens: beyond the 1-2 layers and 64-token rows the plan measures
    return train_preset("tiny", **{"model_overrides": {"num_layers": 3, "hidden_dropout": 0.1}, "seq_len": 96,
                                   "batch_size": 3, "device": "cpu", **overrides})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_a_measurement_of_the_whole_model(precision):
    cfg = _cfg(precision=precision)
    plan = memory_plan.plan(cfg)
    model = FastMLMForMaskedLM(sized_model_config(cfg, cfg.vocab_size))
    batch = memory_plan.synthetic_batch(cfg, cfg.vocab_size, cfg.batch_size, cfg.seq_len)
    measured = memory_plan.saved_activation_bytes(model, batch, memory_plan._amp_dtype(cfg))
    assert plan.activations == pytest.approx(measured, rel=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    assert plan.n_params == n_params
    assert (plan.parameters, plan.gradients, plan.optimizer) == (4 * n_params, 4 * n_params, 8 * n_params)


def test_checkpointing_and_fsdp_shrink_the_plan_and_ddp_adds_buckets():
    cfg = _cfg()
    single = memory_plan.plan(cfg)
    assert memory_plan.plan(_cfg(activation_checkpointing=True)).activations < 0.6 * single.activations
    ddp = memory_plan.plan(cfg, world_size=4)
    assert ddp.gradients == 2 * single.gradients and ddp.optimizer == single.optimizer
    fsdp = memory_plan.plan(cfg, world_size=4, fsdp=True)
    shard = -(-single.n_params // 4)
    assert fsdp.optimizer == 8 * shard and fsdp.gradients == 4 * shard
    assert single.parameters / 4 < fsdp.parameters < single.parameters  # plus the gathered layers in flight
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        memory_plan.plan(cfg, world_size=0)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--device", "cpu", "--out-dir", str(out), "--dry-run"]
    assert cli.main(args + ["--memory-gib", "1000"]) == 0
    text = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer", "activations", "total", "fits in 1000 GiB"):
        assert word in text
    assert not out.exists()
    assert cli.main(args + ["--memory-gib", "0.0001"]) == 0
    assert "does NOT fit in 0.0001 GiB" in capsys.readouterr().out
    assert cli.main(args + ["--memory-gib", "nan"]) == 2
    assert "memory_gib must be None or a number of GiB > 0, got nan" in capsys.readouterr().err


def test_dry_run_of_a_resume_plans_the_run_being_resumed(tmp_path, capsys):
    """`--resume --dry-run` planned the demo preset (a mini model, 16 x 64 tokens) whatever the run was."""
    from mlm_corpus import make_small_corpus

    root = make_small_corpus(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--data", str(root / "train.txt"), "--valid-data",
                     str(root / "valid.txt"), "--tokenizer", str(root / "tokenizer.json"), "--out-dir", str(out),
                     "--max-steps", "1", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--out-dir", str(out), "--resume", "--dry-run", "--memory-gib", "1000"]) == 0
    text = capsys.readouterr().out
    assert "tiny model" in text and "8 x 32 tokens per micro-batch" in text and "fits in 1000 GiB" in text, text
    assert cli.main(["train", "--out-dir", str(out), "--resume", "--dry-run", "--lr", "0.5"]) == 2  # as a resume
    assert "--lr: the run has 0.002, asked 0.5" in capsys.readouterr().err
