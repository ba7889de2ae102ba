"""The fastmlm command on tiny configs: train, eval, fill-mask, export-hf, demo, and its errors."""
import json
from pathlib import Path

import pytest
import torch

from fastmlm import cli
from mlm_corpus import make_small_corpus, one_thread

ROOT = Path(__file__).resolve().parents[1]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (2 steps, a narrower model via --set) shared by the tests below."""
    root = make_small_corpus(tmp_path_factory.mktemp("corpus"))
    out = root / "run"
    code = cli.main(["train", "--preset", "tiny", "--data", str(root / "train.txt"), "--valid-data",
                     str(root / "valid.txt"), "--tokenizer", str(root / "tokenizer.json"), "--out-dir", str(out),
                     "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--no-progress",
                     "--set", "hidden_size=32", "--set", "num_heads=2"])
    assert code == 0
    return root, out


def test_train_writes_a_run(run, capsys):
    root, out = run
    config = json.loads((out / "train_config.json").read_text())
    assert config["max_steps"] == 2 and config["model_overrides"]["hidden_size"] == 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and Path(summary["checkpoint"]).is_dir()
    assert json.loads((Path(summary["checkpoint"]) / "config.json").read_text())["hidden_size"] == 32


def test_eval_prints_accuracy_and_perplexity(run, capsys):
    root, out = run
    assert cli.main(["eval", str(out), "--data", str(root / "valid.txt"), "--seq-len", "32", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_masked"] > 0 and 0 <= metrics["accuracy"] <= 1
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)


def test_fill_mask_lists_top_k(run, capsys):
    _, out = run
    assert cli.main(["fill-mask", str(out), "A list [MASK] items and [MASK] sorted.", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "A list [MASK] items and [MASK] sorted."
    assert lines[1].startswith("  [MASK] 1: ") and lines[2].startswith("  [MASK] 2: ")
    assert all(line.count("%") == 3 for line in lines[1:])


def test_fill_mask_probabilities(run):
    from fastmlm.predict import fill_mask, load_checkpoint

    _, out = run
    model, tokenizer = load_checkpoint(out)
    (options,) = fill_mask(model, tokenizer, "The [MASK] is empty.", top_k=5)
    probs = [p for _, p in options]
    assert len(options) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert not {t for t, _ in options} & {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


def test_cli_errors_are_clear(run, capsys, tmp_path):
    _, out = run
    assert cli.main(["fill-mask", str(out), "no mask here"]) == 2
    assert "no [MASK] token" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "tiny", "--data", str(tmp_path / "none.txt"), "--out-dir",
                     str(tmp_path / "r"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_export_hf_loads_in_transformers(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastmlm.predict import load_checkpoint

    _, out = run
    assert cli.main(["export-hf", str(out), str(tmp_path / "hf")]) == 0
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, tokenizer = load_checkpoint(out)
    text = "A dictionary maps keys to values."
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [2] + tokenizer.encode(text, add_special_tokens=False).ids + [3]
    with torch.no_grad():
        want = hf(input_ids=ids).logits[0]
        got = model.masked_logits(ids, positions=torch.arange(ids.shape[1]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_demo_command_end_to_end(run, tmp_path, capsys, monkeypatch):
    """The demo's whole path (tokenizer, training, evaluation, baseline, fill-mask), on the tiny config."""
    from fastmlm import config

    root, _ = run
    tiny = dict(config.TRAIN_PRESETS["tiny"], data=[str(root / "train.txt")], valid_data=[str(root / "valid.txt")])
    monkeypatch.setitem(config.TRAIN_PRESETS, "demo", tiny)
    assert cli.main(["demo", "--max-steps", "2", "--out-dir", str(tmp_path / "demo"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "unigram-frequency baseline" in text and "fastmlm model" in text
    assert text.count("[MASK]:") == len(cli.DEMO_SENTENCES)


def test_train_flags_cover_the_config():
    from fastmlm.train import TrainConfig

    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in (f.name for f in __import__("dataclasses").fields(TrainConfig) if f.name != "model_overrides"):
        assert "--" + name.replace("_", "-") in text, name
    assert "--resume" in text and "--set" in text


# --------------------------------------------------------------------------- bad input and faults (issue 12)
def _train_args(root, out, *extra):
    return ["train", "--preset", "tiny", "--data", str(root / "train.txt"), "--valid-data", str(root / "valid.txt"),
            "--tokenizer", str(root / "tokenizer.json"), "--out-dir", str(out), "--no-progress",
            "--set", "hidden_size=32", "--set", "num_heads=2", *extra]


def test_bad_devices_are_clear_errors(run, capsys, tmp_path, monkeypatch):
    root, out = run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    commands = {"train": _train_args(root, tmp_path / "r"), "eval": ["eval", str(out)],
                "fill-mask": ["fill-mask", str(out), "A [MASK]."]}
    for command, args in commands.items():
        for device, message in (("xyz", "device='xyz' is not a device fastmlm runs on; expected 'auto', 'cpu'"),
                                ("cuda", "device='cuda': no CUDA GPU is available")):
            assert cli.main([*args, "--device", device]) == 2, (command, device)
            err = capsys.readouterr().err
            assert err.startswith(f"fastmlm {command}: error: {message}") and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


@pytest.mark.parametrize("args,message", [
    (["fill-mask", "RUN", "A [MASK].", "--top-k", "0"], "argument --top-k: expected a positive integer, got '0'"),
    (["eval", "RUN", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    (["eval", "RUN", "--mask-rate", "1.5"], "argument --mask-rate: expected a fraction between 0 and 1"),
    (["demo", "--max-steps", "0"], "argument --max-steps: expected a positive integer, got '0'"),
])
def test_bad_arguments_are_refused_by_the_parser(run, capsys, args, message):
    _, out = run
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(out) if a == "RUN" else a for a in args])
    assert exit_info.value.code == 2
    assert f"fastmlm {args[0]}: error: {message}" in capsys.readouterr().err


def test_library_errors_exit_2_without_a_traceback(run, capsys, tmp_path):
    _, out = run
    assert cli.main(["fill-mask", str(out), "A [MASK].", "--top-k", "100000"]) == 2
    assert "fastmlm fill-mask: error: top_k" in capsys.readouterr().err
    existing = tmp_path / "file"
    existing.write_text("keep me")
    assert cli.main(["export-hf", str(out), str(existing)]) == 2
    assert "fastmlm export-hf: error: " in capsys.readouterr().err and existing.read_text() == "keep me"
    assert cli.main(_train_args(out.parent, out, "--resume", "--overwrite")) == 2
    assert "give one of them" in capsys.readouterr().err
    assert cli.main(["train", "--out-dir", str(out), "--resume", "--no-progress", "--lr", "0.5"]) == 2
    assert "--lr: the run has 0.002, asked 0.5" in capsys.readouterr().err


def test_resume_of_the_finished_run_changes_nothing(run, capsys):
    _, out = run
    before = {p: p.read_bytes() for p in (out / "log.csv", out / "summary.json", out / "train_config.json")}
    assert cli.main(_train_args(out.parent, out, "--max-steps", "2", "--resume")) == 0  # the same command again
    assert "is finished (step 2 of max_steps 2); nothing to do" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in before} == before


def test_ctrl_c_stops_cleanly_and_names_the_last_checkpoint(run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from fastmlm import checkpoint as ckpt

    root, _ = run
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = _train_args(root, out, "--max-steps", "100000", "--save-every", "1", "--device", "cpu")
    proc = subprocess.Popen([sys.executable, "-m", "fastmlm", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while ckpt.latest_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "fastmlm train: interrupted; the last checkpoint is " in err, err
    last = Path(err.split("the last checkpoint is ")[1].split()[0])
    assert last.parent == out / "checkpoints"
    ckpt.verify_checkpoint(last)


def test_train_help_says_which_flags_may_change_on_resume():
    from fastmlm.config import RESUMABLE

    train_parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    (text,) = [action.help for action in train_parser._actions if "--resume" in action.option_strings]
    listed = text.split("These flags may change on resume and take effect: ")[1].split(";")[0]
    assert listed.split(", ") == ["--" + name.replace("_", "-") for name in RESUMABLE]
