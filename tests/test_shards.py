"""Pretokenised shards (fastmlm/shards.py), the shard stream (fastmlm/shard_stream.py), the prefetch thread
(fastmlm/prefetch.py) and training from a shard folder (fastmlm/run_data.py)."""
import csv
import itertools
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmlm import cli, data, shards, train
from fastmlm.corpus_reader import read_documents, split_holdout
from fastmlm.prefetch import Prefetcher
from fastmlm.shard_stream import ShardStream
from fastmlm.tokenizer import load_tokenizer, special_ids, train_tokenizer
from mlm_corpus import corpus, one_thread, tiny  # noqa: F401 (corpus: a fixture)

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return load_tokenizer(corpus / "tokenizer.json")


@pytest.fixture(scope="module")
def shard_dir(corpus, tokenizer, tmp_path_factory):
    """The small corpus's train.txt as shards, small ones so that documents span several files."""
    out = tmp_path_factory.mktemp("shards") / "train"
    shards.prepare([corpus / "train.txt"], tokenizer, out, shard_tokens=5000, progress=False)
    return out


def _rows_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x.segments) == len(y.segments)
        for s, t in zip(x.segments, y.segments):
            assert np.array_equal(s, t)


def test_shards_pack_the_rows_the_raw_text_packs(corpus, tokenizer, shard_dir):
    shard_set = shards.ShardSet(shard_dir)
    assert len(shard_set.index["shards"]) > 2 and shard_set.dtype == np.uint16
    texts = list(read_documents([corpus / "train.txt"]))
    assert shard_set.n_docs == len(texts)
    special = special_ids(tokenizer)
    for seq_len in (32, 37):  # an odd row length too
        raw = list(data.iter_rows(texts, tokenizer, seq_len))
        packed = list(shards.iter_doc_rows(shard_set, np.arange(shard_set.n_docs), seq_len, special.cls, special.sep))
        _rows_equal(packed, raw)
        # each row rebuilt on its own from the row table (what a resumed stream does) is the same row
        stream = ShardStream(shard_set, np.arange(shard_set.n_docs), data.MaskingCollator(tokenizer, seq_len, 4))
        assert len(stream.row_doc) == len(raw)
        some = np.random.default_rng(seq_len).choice(len(raw), 200, replace=False).tolist() + [len(raw) - 1]
        _rows_equal([stream.row(r) for r in some], [raw[r] for r in some])
    # the held-out slice: the same documents as HeldOut cuts from the text
    train_part, valid_part = split_holdout([corpus / "train.txt"], 0.1)
    for part, held in (("train", train_part), ("valid", valid_part)):
        docs = shard_set.select(part, 0.1)
        encoded = [enc.ids for enc in tokenizer.encode_batch(list(held.documents()), add_special_tokens=False)]
        assert len(docs) == len(encoded) and all(np.array_equal(shard_set.tokens(d), e) for d, e in zip(docs, encoded))


def test_shard_batches_are_a_pure_function_of_the_position_and_ranks_split_the_rows(tokenizer, shard_dir):
    shard_set = shards.ShardSet(shard_dir)
    docs = shard_set.select("train", 0.0)[:30]
    collator = data.MaskingCollator(tokenizer, 32, 8)
    make = lambda start, rank=0, world=1: ShardStream(shard_set, docs, collator, 3, rank, world, start)  # noqa
    epoch = make(0).epoch_batches
    first = list(itertools.islice(make(0), 2 * epoch + 3))  # past two epoch boundaries
    for start in (1, epoch, 2 * epoch + 1):
        stream = make(start)
        resumed = list(itertools.islice(stream, 2))
        assert stream.position == start + 2
        for a, b in zip(first[start:], resumed):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(first[0].input_ids, first[epoch].input_ids)  # another epoch, another order
    # two ranks: disjoint rows, together every row of the epoch but the remainder; masks differ per rank
    ranks = [make(0, rank, 2) for rank in (0, 1)]
    seen = [set() for _ in ranks]
    for rank, stream in enumerate(ranks):
        B = collator.batch_size
        for j in range(stream.epoch_batches):
            first_row = (j * 2 + rank) * B
            seen[rank].update(stream.order(0)[first_row:first_row + B].tolist())
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == ranks[0].epoch_batches * 2 * collator.batch_size
    assert len(ranks[0].row_doc) - len(seen[0] | seen[1]) < 2 * collator.batch_size
    assert not np.array_equal(data.batch_rng(3, 5, 0).random(4), data.batch_rng(3, 5, 1).random(4))


def test_shard_resume_costs_the_same_at_step_10_and_at_step_10000(tokenizer, shard_dir):
    """Measured: making a stream at batch 10,000 and reading its first batch takes no longer than at 10."""
    shard_set = shards.ShardSet(shard_dir)
    docs = shard_set.select("train", 0.0)
    collator = data.MaskingCollator(tokenizer, 32, 8)

    def cost(start):
        began = time.perf_counter()
        next(iter(ShardStream(shard_set, docs, collator, 0, 0, 1, start)))
        return time.perf_counter() - began

    cost(10)  # warm-up
    times = {start: statistics.median(cost(start) for _ in range(5)) for start in (10, 10_000)}
    assert times[10_000] < 3 * times[10] + 0.02, times  # a replay of 10,000 batches would take seconds


def test_refusals_name_what_is_wrong(corpus, tokenizer, shard_dir, tmp_path):
    with pytest.raises(ValueError, match="not an empty folder"):
        shards.prepare([corpus / "train.txt"], tokenizer, shard_dir, progress=False)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no document"), pytest.warns(UserWarning, match="no text"):
        shards.prepare([tmp_path / "empty.txt"], tokenizer, tmp_path / "none", progress=False)
    with pytest.raises(ValueError, match="not a shard folder"):
        shards.ShardSet(tmp_path)
    with pytest.raises(ValueError, match="give it alone"):
        shards.shard_folder([shard_dir, corpus / "train.txt"])
    assert shards.shard_folder([corpus / "train.txt"]) is None
    assert shards.token_dtype(65536) == np.uint16 and shards.token_dtype(65537) == np.uint32
    other = train_tokenizer(read_documents([corpus / "valid.txt"]), vocab_size=300)
    with pytest.raises(ValueError, match="another tokenizer"):
        shards.ShardSet(shard_dir).check_tokenizer(other)
    shards.ShardSet(shard_dir).check_tokenizer(load_tokenizer(shard_dir / "tokenizer.json"))  # the saved copy matches
    shards.ShardSet(shard_dir).check_tokenizer(load_tokenizer(corpus / "tokenizer.json"))  # and so does --tokenizer

    broken = tmp_path / "broken"
    shards.prepare([corpus / "valid.txt"], tokenizer, broken, progress=False)
    tokens = broken / "shard_00000.tokens"
    raw = bytearray(tokens.read_bytes())
    raw[:2] = np.array([60000], dtype=np.uint16).tobytes()  # an id outside the vocabulary of 400
    tokens.write_bytes(bytes(raw))
    stream = ShardStream(shards.ShardSet(broken), np.arange(5), data.MaskingCollator(tokenizer, 16, 1))
    with pytest.raises(ValueError, match="token id 60000, outside the vocabulary"):
        for r in range(len(stream.row_doc)):
            stream.batch(r)
    tokens.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        shards.ShardSet(broken)
    (broken / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt or not a fastmlm shard index"):
        shards.ShardSet(broken)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShardStream(shards.ShardSet(shard_dir), np.arange(3), data.MaskingCollator(tokenizer, 32, 1000))


def test_a_failed_prepare_leaves_out_as_it_was(corpus, tokenizer, tmp_path, capsys):
    """A file that breaks off mid-way (a truncated .gz): the shards written before it are removed, so the
    same command runs again once the file is fixed (a half-written --out was refused as "not empty");
    an --out made empty by the user stays, empty. --shard-tokens 0 and an --out inside a file are named."""
    import gzip

    text = (corpus / "train.txt").read_bytes()
    whole = gzip.compress(text * 6)  # half of it is more than prepare() tokenises at once (1024 documents)
    (tmp_path / "cut.txt.gz").write_bytes(whole[:len(whole) // 2])
    for out, existed in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if existed:
            out.mkdir()
        with pytest.raises(ValueError, match="cannot be read past line"):
            shards.prepare([corpus / "train.txt", tmp_path / "cut.txt.gz"], tokenizer, out, shard_tokens=2000,
                           progress=False)
        assert (out.is_dir() and not any(out.iterdir())) if existed else not out.exists()
    (tmp_path / "cut.txt.gz").write_bytes(whole)  # fixed: the same command works
    shards.prepare([corpus / "train.txt", tmp_path / "cut.txt.gz"], tokenizer, tmp_path / "new", shard_tokens=2000,
                   progress=False)
    args = ["prepare-data", "--data", str(corpus / "valid.txt"), "--tokenizer", str(corpus / "tokenizer.json"),
            "--no-progress", "--out"]
    with pytest.raises(SystemExit):
        cli.main([*args, str(tmp_path / "s"), "--shard-tokens", "0"])
    assert "argument --shard-tokens: expected a positive integer, got '0'" in capsys.readouterr().err
    assert cli.main([*args, str(corpus / "valid.txt" / "s")]) == 2  # NotADirectoryError's traceback before
    assert f"error: --out {corpus / 'valid.txt' / 's'}: cannot make the folder" in capsys.readouterr().err


class _Numbers:
    """A stand-in stream: batches are ints, with an error at ``fail_at``."""

    def __init__(self, fail_at=None):
        self.position, self.epoch_batches, self.fail_at, self.made = 5, None, fail_at, 0
        self.collator = data.MaskingCollator.__new__(data.MaskingCollator)
        self.collator.batch_size, self.collator.seq_len = 2, 3

    def __iter__(self):
        for i in itertools.count():
            if i == self.fail_at:
                raise ValueError(f"bad batch {i}")
            self.made += 1
            yield data.Batch(torch.tensor([i]), None, None, n_tokens=6)


def test_prefetcher_hands_out_in_order_counts_what_it_handed_out_and_stops():
    stream = _Numbers()
    with Prefetcher(stream, depth=2) as batches:
        got = [int(next(batches).input_ids) for _ in range(3)]
        waited = time.monotonic()
        while stream.made < 5 and time.monotonic() - waited < 10:  # the thread fills its queue of 2
            time.sleep(0.01)
        assert got == [0, 1, 2] and batches.position == 8 and stream.made >= 5  # made ahead, not counted
        assert batches.efficiency == 1.0
    assert not batches._thread.is_alive()  # closed: no thread left behind
    with Prefetcher(_Numbers(fail_at=2)) as batches:
        assert int(next(batches).input_ids) == 0 and int(next(batches).input_ids) == 1
        with pytest.raises(ValueError, match="bad batch 2"):
            next(batches)
    assert threading.active_count() < 50
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(_Numbers(), depth=0)


def _train_losses(run):
    with open(Path(run) / "log.csv", newline="") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f) if r["split"] == "train"}


def test_training_from_shards_resumes_exactly_and_refuses_another_tokenizer(corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert cli.main(["prepare-data", "--data", str(corpus / "train.txt"), "--tokenizer",
                     str(corpus / "tokenizer.json"), "--out", str(out), "--no-progress"]) == 0
    assert "documents" in capsys.readouterr().out
    settings = dict(data=[str(out)], valid_data=None, valid_holdout=0.1, tokenizer=None, max_steps=6,
                    eval_every=6, save_every=3, log_every=1)  # one validation (and curves.png) per run
    whole = train.train(tiny(corpus, tmp_path / "whole", **settings))
    train.train(tiny(corpus, tmp_path / "half", stop_after=3, **settings))
    capsys.readouterr()
    resumed = train.train(tiny(corpus, tmp_path / "half", **settings), resume="latest")
    assert "no replay" in capsys.readouterr().out
    losses = _train_losses(tmp_path / "whole")
    assert losses == _train_losses(tmp_path / "half") and len(losses) == 6
    assert resumed["valid"]["loss"] == whole["valid"]["loss"] and whole["valid"]["n_masked"] > 0
    other = tmp_path / "other.json"
    train_tokenizer(read_documents([corpus / "valid.txt"]), vocab_size=300).save(str(other))
    with pytest.raises(ValueError, match="another tokenizer"):
        train.train(tiny(corpus, tmp_path / "refused", **{**settings, "tokenizer": str(other)}))


def test_shard_stream_checks_its_arguments_and_the_collators_tokenizer(corpus, tokenizer, shard_dir):
    shard_set = shards.ShardSet(shard_dir)
    collator = data.MaskingCollator(tokenizer, 32, 2)
    docs = np.arange(shard_set.n_docs)
    # another tokenizer of the same vocabulary size: before, its ids were trained on silently
    other = train_tokenizer(read_documents([corpus / "valid.txt"]), vocab_size=tokenizer.get_vocab_size())
    assert other.get_vocab_size() == tokenizer.get_vocab_size()
    with pytest.raises(ValueError, match="tokenised with another tokenizer than the collator's tokenizer"):
        ShardStream(shard_set, docs, data.MaskingCollator(other, 32, 2))
    n = shard_set.n_docs
    for bad, got in ((np.array([-1, 0, 1]), "int64 values from -1 to 1"),  # -1 was the last document
                     (np.array([0, n]), f"int64 values from 0 to {n}"),   # an IndexError inside numpy
                     (docs.astype(float), "float64 values")):
        with pytest.raises(ValueError, match=rf"docs must be a 1-d array of document numbers in \[0, {n}\).*got {got}"):
            ShardStream(shard_set, bad, collator)
    for kwargs, message in [(dict(rank=2, world_size=2), r"rank must lie in \[0, world_size=2\), got 2"),
                            (dict(world_size=0), "world_size must be an int >= 1, got 0"),  # ZeroDivisionError
                            (dict(start=-1), "start must be an int >= 0, got -1")]:  # a TypeError from numpy
        with pytest.raises(ValueError, match=message):
            ShardStream(shard_set, docs, collator, **kwargs)


def test_prefetcher_next_after_close_raises_instead_of_hanging():
    batches = Prefetcher(_Numbers())
    assert int(next(batches).input_ids) == 0
    batches.close()
    outcome = []

    def call():
        try:
            next(batches)
        except ValueError as exc:
            outcome.append(str(exc))

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(5)  # before: next() waited on the empty queue forever
    assert not caller.is_alive() and outcome and "closed Prefetcher" in outcome[0]


def test_an_index_with_a_missing_field_or_a_document_table_out_of_order_is_refused(corpus, tokenizer, tmp_path):
    """A hand-edited or foreign index.json was a KeyError ('vocab_size') or numpy's TypeError (dtype 'foo'),
    and offsets out of order were read, dropping or repeating documents silently."""
    import json

    folder = tmp_path / "shards"
    shards.prepare([corpus / "valid.txt"], tokenizer, folder, progress=False)
    index = json.loads((folder / "index.json").read_text())
    for broken in ({k: v for k, v in index.items() if k != "vocab_size"}, {**index, "dtype": "foo"},
                   {**index, "shards": [{"name": 7}]}):
        (folder / "index.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="index.json: a field is missing or of the wrong type"):
            shards.ShardSet(folder)
    (folder / "index.json").write_text(json.dumps(index))
    assert shards.ShardSet(folder).n_docs == index["documents"]
    docs = folder / "shard_00000.docs.npy"
    offsets = np.load(docs)
    assert len(offsets) > 3
    offsets[1], offsets[2] = offsets[2], offsets[1]  # same first and last entry, same length: only the order
    np.save(docs, offsets)
    with pytest.raises(ValueError, match="its document table does not match the index"):
        shards.ShardSet(folder)
