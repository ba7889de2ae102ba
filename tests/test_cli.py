"""The fastmlm command on tiny configs: train, eval, fill-mask, export-hf, demo, and its errors."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from fastmlm import cli
from fastmlm.demo import DEMO_SENTENCES
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
    if importlib.util.find_spec("matplotlib"):
        assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")  # drawn at the validation
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
    assert text.count("[MASK]:") == len(DEMO_SENTENCES)


def test_train_flags_cover_the_config():
    from fastmlm.train import TrainConfig

    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in (f.name for f in __import__("dataclasses").fields(TrainConfig)
                 if f.name not in ("model_overrides", "made_by")):
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


def test_paths_that_cannot_be_written_are_named_not_a_traceback(run, capsys, tmp_path):
    """A file given where a folder is made: NotADirectoryError / FileExistsError tracebacks (or a bare
    "[Errno 17] File exists: ...") before; now an error naming the flag, with the file left as it was."""
    root, out = run
    existing = tmp_path / "file"
    existing.write_text("keep me")
    for args, message in [(_train_args(root, existing), f"--out-dir {existing} is a file; expected a run folder"),
                          (_train_args(root, existing / "run"), f"--out-dir {existing / 'run'}: cannot make the run "
                                                                f"folder (Not a directory: "),
                          (["export-hf", str(out), str(existing / "export")],
                           f"Not a directory: {existing / 'export'}")]:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert f"fastmlm {args[0]}: error: {message}" in err and "Traceback" not in err, err
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("flags,message", [
    (["--memory-gib", "4"], "--memory-gib says whether the memory plan of --dry-run fits"),
    (["--valid-holdout", "0.2"], "--valid-holdout holds out validation text from --data when there is no --valid-data"),
])
def test_flags_that_would_be_ignored_are_refused(run, capsys, tmp_path, flags, message):
    """Each was ignored without a word beside the other flags (a full run trained, no plan compared)."""
    root, _ = run
    assert cli.main(_train_args(root, tmp_path / "r", *flags)) == 2
    assert f"fastmlm train: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


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


# --------------------------------------------------------------------------- a CLI that explains itself (issue 17)
def _subparsers():
    return cli.build_parser()._subparsers._group_actions[0].choices


def test_every_flag_explains_itself_with_its_default_and_choices():
    for name, parser in _subparsers().items():
        if name == "bench":  # its flags are the benchmark's own (next test)
            continue
        for action in parser._actions:
            if action.help == "show this help message and exit":
                continue
            text = parser._get_formatter()._expand_help(action)
            where = f"fastmlm {name} {'/'.join(action.option_strings) or action.dest}"
            assert len(text.split("(default")[0]) > 10, where  # a description, not a bare name
            if action.option_strings:
                assert "default: " in text, where
            for choice in action.choices or ():
                assert str(choice) in text.split("choices: ")[-1], (where, choice)
    train = _subparsers()["train"].format_help()
    assert "--lr LR" in train and "peak learning rate" in train and "(default: " in train
    assert "--schedule SCHEDULE" in train and "choices: linear, cosine" in train


def test_bench_help_shows_the_benchmark_options(capfd):
    assert cli.main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert "every argument goes to `python -m benchmarks`" in out
    assert "usage: python -m benchmarks" in out and "--preset" in out and "--ops" in out


def test_eval_and_fill_mask_take_hugging_face_folders(run, tmp_path, capsys):
    """The run and its export-hf folder give the same figures and fills."""
    root, out = run
    hf = tmp_path / "hf"
    assert cli.main(["export-hf", str(out), str(hf)]) == 0
    capsys.readouterr()
    results = []
    for folder in (out, hf):
        assert cli.main(["eval", str(folder), "--data", str(root / "valid.txt"), "--seq-len", "32", "--batch-size",
                         "8", "--mask-rate", "0.15", "--json"]) == 0  # the run's own settings: the same for both
        metrics = json.loads(capsys.readouterr().out)
        assert cli.main(["fill-mask", str(folder), "A [MASK] holds items.", "--top-k", "3"]) == 0
        results.append((metrics, capsys.readouterr().out))
    (ours, our_fill), (theirs, their_fill) = results
    assert ours["n_masked"] == theirs["n_masked"] > 0
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5) and our_fill == their_fill
    (hf / "tokenizer.json").unlink()
    (hf / "vocab.txt").unlink()
    assert cli.main(["eval", str(hf)]) == 2
    assert "needs its tokenizer beside the weights" in capsys.readouterr().err


def test_a_transformers_folder_is_evaluated_as_transformers_scores_it(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from fastmlm.predict import load_checkpoint

    root, out = run
    hf = tmp_path / "bert"
    config = transformers.BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(hf)
    shutil.copy(root / "tokenizer.json", hf / "tokenizer.json")
    assert cli.main(["fill-mask", str(hf), "A [MASK] holds items.", "--top-k", "2"]) == 0
    assert capsys.readouterr().out.startswith("A [MASK] holds items.\n  [MASK]: ")
    assert cli.main(["eval", str(hf), "--data", str(root / "valid.txt"), "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_masked"] > 0
    model, _ = load_checkpoint(hf)
    ids = torch.tensor([[2, 10, 11, 4, 12, 3]])
    want = transformers.BertForMaskedLM.from_pretrained(hf).eval()(input_ids=ids).logits[0]
    torch.testing.assert_close(model.masked_logits(ids, positions=torch.arange(6)), want, rtol=1e-4, atol=1e-4)


def test_train_without_valid_data_validates_on_a_held_out_slice(run, tmp_path, capsys):
    root, _ = run
    out = tmp_path / "r"
    args = ["train", "--preset", "tiny", "--data", str(root / "train.txt"), "--tokenizer", str(root / "tokenizer.json"),
            "--out-dir", str(out), "--max-steps", "2", "--eval-every", "2", "--no-progress",
            "--set", "hidden_size=32", "--set", "num_heads=2", "--valid-holdout", "0.05"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "validation: the held-out validation slice (5% of the documents) of " in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["valid"]["n_masked"] > 0
    from fastmlm.corpus_reader import read_documents, split_holdout

    train_docs, valid_docs = (list(read_documents(p)) for p in split_holdout([root / "train.txt"], 0.05))
    assert valid_docs and not set(train_docs) & set(valid_docs)


def test_progress_is_plain_lines_when_the_output_is_redirected(run, tmp_path, capsys):
    root, _ = run
    args = _train_args(root, tmp_path / "r", "--max-steps", "3", "--log-every", "1", "--progress")
    assert cli.main(args) == 0
    captured = capsys.readouterr()  # not a terminal
    lines = [line for line in captured.out.splitlines() if line.startswith("step ") and "|" in line]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3 (33%)", "step 2/3 (67%)", "step 3/3 (100%)"]
    assert all("tokens/s" in line and "ETA" in line for line in lines)
    assert "\r" not in captured.out + captured.err


def test_progress_is_a_bar_on_a_terminal(monkeypatch, capsys):
    import sys

    from fastmlm.progress import Progress

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with Progress(10, 0, enabled=True) as bar:
        assert bar.mode == "bar" and bar.bar is not None
        bar.update(1)
        bar.log(5.0, 1e-3, 1000.0)
    assert Progress(10, 0, enabled=False).mode == "off"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert Progress(10, 0, enabled=True).mode == "lines"


def test_compile_runs_the_training_step_under_torch_compile(run, tmp_path, monkeypatch):
    """--compile wraps the training model in torch.compile; here with a quick backend and fullgraph=True,
    so a graph break in the training step fails the test (Inductor's C++ build is too slow for the tier)."""
    root, _ = run
    calls = []
    real = torch.compile

    def quick_compile(model, **kwargs):
        calls.append(model)
        return real(model, backend="aot_eager", fullgraph=True, **kwargs)

    monkeypatch.setattr(torch, "compile", quick_compile)
    torch._dynamo.reset()
    out = tmp_path / "r"
    assert cli.main(_train_args(root, out, "--max-steps", "2", "--eval-every", "2", "--compile")) == 0
    assert len(calls) == 1 and type(calls[0]).__name__ == "FastMLMForMaskedLM"
    assert json.loads((out / "train_config.json").read_text())["compile"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["valid"]["n_masked"] > 0


def test_demo_never_replaces_a_train_run(run, tmp_path, capsys):
    from fastmlm.run_dir import check_demo_may_replace

    _, out = run
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cli.main(["demo", "--out-dir", str(out), "--max-steps", "1", "--no-progress"]) == 2
    assert "holds a run that `fastmlm train` made" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    demo = tmp_path / "demo"
    shutil.copytree(out, demo)
    config = json.loads((demo / "train_config.json").read_text())
    (demo / "train_config.json").write_text(json.dumps({**config, "made_by": "demo"}))
    check_demo_may_replace(demo)  # a demo run may be replaced by the next demo
    check_demo_may_replace(tmp_path / "empty")  # and so may nothing


def test_resume_moves_the_data_before_the_first_step(run, tmp_path, capsys):
    root, _ = run
    out = tmp_path / "r"
    assert cli.main(_train_args(root, out, "--max-steps", "4", "--stop-after", "2", "--save-every", "2")) == 0
    capsys.readouterr()
    assert cli.main(_train_args(root, out, "--max-steps", "4", "--resume", "--log-every", "1", "--progress")) == 0
    lines = capsys.readouterr().out.splitlines()
    skip = next(i for i, line in enumerate(lines) if line.startswith("resume: the data is at batch 2 after "))
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 3/4 (75%) | "))
    assert skip < first_step
    from fastmlm import checkpoint as ckpt

    state = ckpt.load_trainer_state(ckpt.latest_checkpoint(out / "checkpoints"))
    assert state["data_position"] == 4 and len(state["data_epoch_batches"]) == 1


def test_eval_json_writes_a_perplexity_past_the_float_range_as_null(monkeypatch, capsys):
    """A diverged model's perplexity is exp(loss) = inf; json.dumps wrote Infinity, which JSON readers refuse."""
    import fastmlm.predict as predict

    monkeypatch.setattr(predict, "load_checkpoint", lambda path, device: (None, None))
    monkeypatch.setattr(predict, "run_settings", lambda path: {})
    monkeypatch.setattr(predict, "evaluate_text", lambda *a, **k: {"accuracy": 0.0, "perplexity": float("inf"),
                                                                   "loss": 800.0, "n_masked": 3})
    assert cli.main(["eval", "some/run", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=pytest.fail) == {
        "accuracy": 0.0, "perplexity": None, "loss": 800.0, "n_masked": 3}
