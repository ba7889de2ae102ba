"""Fine-tuning tasks: the two bundled ones, or JSONL files; checked line by line, then tokenised.

    --task docs-section      fastmlm/tasks/data/docs-section.{train,valid}.jsonl.gz   (sequence classification)
    --task code-entities     fastmlm/tasks/data/code-entities.{train,valid}.jsonl.gz  (token classification)
    --task FILE.jsonl        {"text": str, "label": str} lines, or {"tokens": [str], "tags": [str]} lines

A custom file without ``--valid FILE.jsonl`` is split by a hash of each line's content
(VALID_PERCENT of it to validation), so the split is the same in every run. Other keys on a
line (the bundled files' ``"page"``) are ignored. Tags are BIO (``B-X``, ``I-X``, ``O``); the
label set is the training split's. A bad line is a :class:`TaskFileError` naming ``file:line``.

Tokenising (:func:`encode`): ``[CLS] text [SEP]``, cut to ``max_len`` tokens. For tags, each
word is tokenised on its own (``is_pretokenized``) and only its first sub-token carries its tag
(the others, and [CLS]/[SEP], are -100), as Hugging Face's token-classification recipe does;
words cut off by ``max_len`` are predicted ``O``.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..corpus_reader import UnreadableFile, read_jsonl
from ..data import IGNORE_INDEX
from ..tokenizer import special_ids

DATA = Path(__file__).resolve().parent.parent / "tasks" / "data"
BUNDLED = {"docs-section": "sequence", "code-entities": "tokens"}
VALID_PERCENT = 10


class TaskFileError(ValueError):
    """A task file that cannot be read, or a line in it that is not a valid example (the message names file:line)."""


@dataclass
class Task:
    """A loaded task: ``kind`` "sequence" (examples are (text, label)) or "tokens" ((tokens, tags))."""

    name: str
    kind: str
    labels: list[str]
    train: list[tuple]
    valid: list[tuple]

    def describe(self) -> str:
        what = "sequence classification" if self.kind == "sequence" else "token classification (BIO tags)"
        return (f"{self.name}: {what}, {len(self.labels)} labels, {len(self.train)} train / {len(self.valid)} "
                f"valid examples")


# --------------------------------------------------------------------------- reading and checking
def _example(record, where: str, kind: Optional[str]) -> tuple[str, tuple]:
    """(kind, example) of one JSON line; TaskFileError naming ``where`` (file:line) otherwise."""
    if not isinstance(record, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    found = "sequence" if "text" in record or "label" in record else \
        "tokens" if "tokens" in record or "tags" in record else None
    if found is None:
        raise TaskFileError(f"{where}: expected {{\"text\", \"label\"}} or {{\"tokens\", \"tags\"}}, "
                            f"got keys {sorted(record)}")
    if kind is not None and found != kind:
        raise TaskFileError(f"{where}: a {found} example in a file of {kind} examples (every line must have "
                            f"the same keys as the first)")
    if found == "sequence":
        text, label = record.get("text"), record.get("label")
        if not isinstance(text, str) or not text.strip():
            raise TaskFileError(f"{where}: \"text\" must be a non-empty string, got {text!r}")
        if not isinstance(label, str) or not label.strip():  # a blank label is a missing one, as a blank text
            raise TaskFileError(f"{where}: \"label\" must be a non-empty string, got {label!r}")
        _check_unicode(where, (text, label))
        return found, (text, label)
    tokens, tags = record.get("tokens"), record.get("tags")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
        raise TaskFileError(f"{where}: \"tokens\" must be a non-empty list of non-empty strings, got {tokens!r}")
    if not isinstance(tags, list) or len(tags) != len(tokens):
        n = len(tags) if isinstance(tags, list) else type(tags).__name__
        raise TaskFileError(f"{where}: \"tags\" must be a list with one tag per token ({len(tokens)}), got {n}")
    for tag in tags:
        if not isinstance(tag, str) or not (tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)):
            raise TaskFileError(f"{where}: tag {tag!r} is not a BIO tag (\"O\", \"B-TYPE\" or \"I-TYPE\")")
    _check_unicode(where, tokens + tags)
    return found, (tokens, tags)


def _check_unicode(where: str, strings) -> None:
    """TaskFileError unless every string is Unicode text: JSON can spell an unpaired surrogate
    ("\\udc80"), which no tokenizer takes."""
    for string in strings:
        try:
            string.encode("utf-8")
        except UnicodeEncodeError:
            shown = string if len(string) <= 60 else string[:57] + "..."
            raise TaskFileError(f"{where}: {shown!r} holds an unpaired surrogate escape (\\ud800-\\udfff), "
                                f"which is not text") from None


def read_examples(path, kind: Optional[str] = None) -> tuple[str, list[tuple]]:
    """(kind, examples) of a JSONL file (gzipped when it ends in .gz, read by
    fastmlm.corpus_reader.read_jsonl); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise TaskFileError(f"task file {path} {what} (expected a .jsonl file, or one of {sorted(BUNDLED)})")
    examples = []
    try:
        for number, record in read_jsonl(path, error=TaskFileError):
            kind, example = _example(record, f"{path}:{number}", kind)
            examples.append(example)
    except UnreadableFile as exc:  # a binary file, a truncated .gz
        raise TaskFileError(f"cannot read {path} as UTF-8 JSON lines (past line {exc.line}: {exc.detail})") from None
    if not examples:
        raise TaskFileError(f"{path} holds no examples")
    return kind, examples


def _held_out(example: tuple) -> bool:
    return zlib.crc32(json.dumps(example).encode()) % 100 < VALID_PERCENT


def load_task(task: str, valid: Optional[str] = None) -> Task:
    """A bundled task by name, or a JSONL file (with its own validation file, or a hashed split of it)."""
    if task in BUNDLED:
        kind, train = read_examples(DATA / f"{task}.train.jsonl.gz", BUNDLED[task])
        _, held = read_examples(valid or DATA / f"{task}.valid.jsonl.gz", kind)
        name = task
    else:
        kind, examples = read_examples(task)
        if valid is not None:
            train, (_, held) = examples, read_examples(valid, kind)
        else:
            train = [e for e in examples if not _held_out(e)]
            held = [e for e in examples if _held_out(e)]
        name = Path(task).name
    if not train or not held:
        raise TaskFileError(f"{task}: {len(train)} training and {len(held)} validation examples; both splits "
                            f"need at least one (give --valid FILE.jsonl for a small file)")
    labels = label_set(kind, train)
    if len(labels) < 2:
        raise TaskFileError(f"{task}: the training split has only the label(s) {labels}; a classifier needs two "
                            f"or more")
    unknown = sorted(set(label_set(kind, held)) - set(labels)) if kind == "sequence" else \
        sorted({t for _, tags in held for t in tags} - set(labels))
    if unknown:
        raise TaskFileError(f"{task}: the validation split has labels the training split lacks: {unknown}")
    return Task(name, kind, list(labels), train, held)


def task_digest(task: Task) -> str:
    """The sha256 of a task's kind, labels and both splits (as trained: after --max-train-examples). A
    resumed run compares it with its own, so a task file edited since is refused, not trained on
    silently beside the old epochs and baselines."""
    return hashlib.sha256(json.dumps([task.kind, task.labels, task.train, task.valid]).encode()).hexdigest()


def shared_inputs(task: Task) -> int:
    """How many validation examples have the input (text, or tokens) of a training example: a
    --valid file that repeats the training file, or a text given twice with two labels."""
    seen = {json.dumps(x) for x, _ in task.train}
    return sum(json.dumps(x) in seen for x, _ in task.valid)


def label_set(kind: str, examples) -> list[str] | set:
    """The labels of ``examples``: sorted class names, or for tags "O" then every B-/I- tag of each type."""
    if kind == "sequence":
        return sorted({label for _, label in examples})
    types = sorted({tag[2:] for _, tags in examples for tag in tags if tag != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


# --------------------------------------------------------------------------- tokenising
@dataclass
class Encoded:
    """One tokenised split: ``ids[i]`` (list of ids with [CLS]/[SEP]), ``targets[i]`` (a class index,
    or per-token indices with -100), and for tags ``first[i]``: for each word, the index of its
    first token in the row, -1 when the row holds none of it."""

    ids: list[list[int]]
    targets: list
    first: Optional[list[list[int]]] = None


def encode(tokenizer, task: Task, examples, max_len: int) -> Encoded:
    """Tokenise ``examples`` of ``task`` into rows of at most ``max_len`` tokens (see the module docstring)."""
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3 ([CLS], a token, [SEP]), got {max_len}")
    special = special_ids(tokenizer)
    index = {label: i for i, label in enumerate(task.labels)}
    if task.kind == "sequence":
        encodings = tokenizer.encode_batch([text for text, _ in examples], add_special_tokens=False)
        ids = [[special.cls] + e.ids[:max_len - 2] + [special.sep] for e in encodings]
        return Encoded(ids, [index[label] for _, label in examples])
    encodings = tokenizer.encode_batch([tokens for tokens, _ in examples], is_pretokenized=True,
                                       add_special_tokens=False)
    rows, targets, firsts = [], [], []
    for e, (_, tags) in zip(encodings, examples):
        body = e.ids[:max_len - 2]
        target = [IGNORE_INDEX] * (len(body) + 2)
        first = [-1] * len(tags)  # -1: the word has no token in the row (cut off, or normalised away)
        for position, word in enumerate(e.word_ids[:len(body)]):
            if word is not None and first[word] < 0:  # a word's first sub-token carries its tag
                target[position + 1] = index[tags[word]]
                first[word] = position + 1
        rows.append([special.cls] + body + [special.sep])
        targets.append(target)
        firsts.append(first)
    return Encoded(rows, targets, firsts)


def batches(encoded: Encoded, batch_size: int, pad_id: int, order=None):
    """Padded (input_ids, attention_mask, labels) int64 numpy batches of ``encoded`` in ``order``."""
    order = np.arange(len(encoded.ids)) if order is None else order
    for start in range(0, len(order), batch_size):
        pick = order[start:start + batch_size]
        width = max(len(encoded.ids[i]) for i in pick)
        ids = np.full((len(pick), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(pick), width), dtype=np.int64)
        labels = np.full((len(pick), width), IGNORE_INDEX, dtype=np.int64) if encoded.first is not None else \
            np.array([encoded.targets[i] for i in pick], dtype=np.int64)
        for row, i in enumerate(pick):
            n = len(encoded.ids[i])
            ids[row, :n], mask[row, :n] = encoded.ids[i], 1
            if encoded.first is not None:
                labels[row, :n] = encoded.targets[i]
        yield pick, ids, mask, labels
