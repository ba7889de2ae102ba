"""Corpus reading (fastmlm/corpus_reader.py), tokenizer (fastmlm/tokenizer.py), packing, dynamic masking and
resumable batch streams (fastmlm/data.py)."""
import gzip
import itertools
import json
import warnings

import numpy as np
import pytest
import torch

from fastmlm import data
from fastmlm.corpus_reader import CorpusWarning, bundled_corpus, read_documents
from fastmlm.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_ids, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    docs = itertools.islice(read_documents([bundled_corpus("train")]), 300)
    return train_tokenizer(docs, vocab_size=600)


def _rows(tokenizer, n_docs=40, seq_len=64):
    docs = itertools.islice(read_documents([bundled_corpus("train")]), n_docs)
    return list(data.iter_rows(docs, tokenizer, seq_len))


# --------------------------------------------------------------------------- corpus
def test_bundled_corpus_is_real_text_of_a_few_megabytes():
    train = list(read_documents([bundled_corpus("train")]))
    valid = list(read_documents([bundled_corpus("valid")]))
    assert sum(len(d) for d in train) > 5_000_000 and len(valid) > 20
    assert not set(valid[:20]) & set(train)  # the splits are disjoint pages
    assert "Python" in " ".join(train[:200])


def test_read_documents_txt_jsonl_gz_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first doc line one\nline two\n\n\nsecond doc\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "third doc"}) + "\n\n" + json.dumps({"text": "fourth", "id": 3}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt.gz").write_bytes(gzip.compress(b"fifth doc"))
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    docs = list(read_documents([tmp_path]))
    assert docs == ["first doc line one\nline two", "second doc", "third doc", "fourth", "fifth doc"]
    # sharding for data-parallel ranks: disjoint, and together everything
    shards = [list(read_documents([tmp_path], rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(docs) and not set(shards[0]) & set(shards[1])


def test_read_documents_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(read_documents([tmp_path / "missing.txt"]))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(read_documents([tmp_path / "x.csv"]))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_documents([tmp_path / "bad.jsonl"]))
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match='"text" string'):
        list(read_documents([tmp_path / "notext.jsonl"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        list(read_documents([tmp_path / "empty"]))


def test_bytes_that_are_not_utf8_warn_once_per_file_with_the_count(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("ok\n\ncafé au lait\n\nnaïve\ncrème\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl.gz").write_bytes(gzip.compress(b'{"text": "caf\xe9 \\udce9"}\n'))  # byte, escape
    (tmp_path / "good.txt").write_text("déjà vu\n", encoding="utf-8")
    with pytest.warns(CorpusWarning) as caught:
        docs = list(read_documents([tmp_path]))
    # only the undecodable characters are lost
    assert docs == ["déjà vu", "caf\ufffd \ufffd", "ok", "caf\ufffd au lait", "na\ufffdve\ncr\ufffdme"]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2  # one per damaged file, none for good.txt
    assert "latin1.jsonl.gz: 2 undecodable byte(s) on 1 line(s), the first on line 1" in messages[0]
    assert "latin1.txt: 3 undecodable byte(s) on 3 line(s), the first on line 3" in messages[1]


def test_utf8_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfthird\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(read_documents([tmp_path])) == ["first", "second", "third"]


def test_corrupt_gzip_and_empty_files(tmp_path):
    whole = gzip.compress(("line\n" * 20000).encode())
    (tmp_path / "truncated.txt.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"truncated.txt.gz: cannot be read past line \d+: .*corrupt or truncated"):
        list(read_documents([tmp_path / "truncated.txt.gz"]))
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not gzip"}\n')
    with pytest.raises(ValueError, match=r"plain.jsonl.gz: cannot be read past line 0: Not a gzipped file"):
        list(read_documents([tmp_path / "plain.jsonl.gz"]))
    (tmp_path / "crc.txt.gz").write_bytes(whole[:-8] + b"\0" * 8)  # damaged trailer: checksum and length
    with pytest.raises(ValueError, match="crc.txt.gz: cannot be read past line 20000"):
        list(read_documents([tmp_path / "crc.txt.gz"]))
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_empty.txt").write_text("")
    (folder / "b_blank.jsonl").write_text("\n  \n")
    (folder / "c.txt").write_text("kept")
    with pytest.warns(CorpusWarning) as caught:
        assert list(read_documents([folder])) == ["kept"]
    assert sorted(str(w.message).rsplit("/", 1)[-1] for w in caught) == [
        "a_empty.txt holds no text; skipped", "b_blank.jsonl holds no text; skipped"]


def test_jsonl_errors_say_what_the_line_holds(tmp_path):
    cases = {'{"body": "x"}': r"got an object with keys \['body'\]", '["x"]': "got a JSON list",
             '{"text": null}': 'got a "text" of type NoneType'}
    for line, got in cases.items():
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
        with pytest.raises(ValueError, match=r'bad.jsonl:2: each JSONL line must be an object with a "text" string, '
                                             + got):
            list(read_documents([tmp_path / "bad.jsonl"]))


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_special_tokens_unknown_chars_and_round_trip(tokenizer, tmp_path):
    special = special_ids(tokenizer)
    assert special.all == (0, 1, 2, 3, 4) and tokenizer.get_vocab_size() == 600
    enc = tokenizer.encode("The list [MASK] sorted \u2603.", add_special_tokens=False)
    assert special.mask in enc.ids and special.unk in enc.ids  # snowman: never seen -> [UNK]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    tokenizer.model.save(str(tmp_path))  # vocab.txt
    for path in (tmp_path / "tokenizer.json", tmp_path / "vocab.txt"):
        other = load_tokenizer(path)
        assert other.encode("Lists are mutable sequences.").ids == tokenizer.encode("Lists are mutable sequences.").ids
    assert load_tokenizer(tmp_path).get_vocab_size() == 600  # a folder: tokenizer.json first


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], vocab_size=10)


def test_vocab_txt_duplicates_and_binary_files_are_refused_by_name(tmp_path):
    specials = "\n".join(SPECIAL_TOKENS)
    (tmp_path / "vocab.txt").write_text(f"{specials}\nhello\nworld\nhello\n")
    with pytest.raises(ValueError, match=r"vocab.txt:8: the token 'hello' is already on line 6"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "vocab.txt").write_bytes(specials.encode() + b"\nok\n\x89PNG\x00\xff\n")
    with pytest.raises(ValueError, match=r"vocab.txt is not a UTF-8 text file \(byte 34, on line 7, is not UTF-8\)"):
        load_tokenizer(tmp_path / "vocab.txt")
    # ids are line indexes, as tokenizers reads them: trailing blanks and \r\n ignored, a BOM too
    (tmp_path / "vocab.txt").write_bytes(b"\xef\xbb\xbf" + specials.encode() + b"\r\nhello  \r\n##s\n")
    tokenizer = load_tokenizer(tmp_path / "vocab.txt")
    assert tokenizer.get_vocab()["[PAD]"] == 0 and tokenizer.encode("hellos", add_special_tokens=False).ids == [5, 6]


def test_tokenizer_json_truncation_and_padding_are_turned_off(tokenizer, tmp_path):
    saved = load_tokenizer(_save(tokenizer, tmp_path / "plain.json"))
    saved.enable_truncation(max_length=16)
    saved.enable_padding(length=64, pad_id=0, pad_token="[PAD]")
    path = _save(saved, tmp_path / "tokenizer.json")
    assert json.loads(path.read_text())["truncation"] and json.loads(path.read_text())["padding"]
    loaded = load_tokenizer(path)
    assert loaded.truncation is None and loaded.padding is None
    docs = ["lists hold items " * 20, "short"]
    expected = [t for e in tokenizer.encode_batch(docs, add_special_tokens=False) for t in e.ids]
    special = special_ids(tokenizer).all
    packed = [t for r in data.iter_rows(docs, loaded, 32) for s in r.segments for t in s.tolist() if t not in special]
    assert len(expected) > 60 and packed == expected  # every token, no [PAD]
    with pytest.raises(ValueError, match=r"truncation=\{.*'max_length': 16.*padding=\{.*off"):
        list(data.iter_rows(docs, saved, 32))  # a tokenizer built in code is checked, not changed


def _save(tokenizer, path):
    tokenizer.save(str(path))
    return path


def test_trained_alphabet_and_empty_training_text():
    tokenizer = train_tokenizer(["ab ab ab, cb"] * 3, vocab_size=105)
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    # every character is a piece of its own, also one only seen inside words (b), as WordPieceTrainer has it
    assert {"a", "b", "c", ",", "##b", "ab"} <= vocab.keys() and not any("\U000f0000" <= c for t in vocab for c in t)
    assert tokenizer.encode("ab cb b", add_special_tokens=False).tokens == ["ab", "cb", "b"]
    with pytest.raises(ValueError, match="hold no text"):
        train_tokenizer(["", "  \n"], vocab_size=200)


# --------------------------------------------------------------------------- segments and packing
def test_row_packer_fills_rows_exactly_and_splits_documents():
    packer = data.RowPacker(8, cls=2, sep=3)
    rows = list(packer.add([10, 11, 12])) + list(packer.add(list(range(20, 31)))) + list(packer.add([40]))
    rows += list(packer.flush())
    flat = [np.concatenate(r.segments).tolist() for r in rows]
    assert flat == [[2, 10, 11, 12, 3, 2, 20, 3],          # doc 2 split after one token
                    [2, 21, 22, 23, 24, 25, 26, 3],
                    [2, 27, 28, 29, 30, 3, 3, 3],          # 2 slots left: extra [SEP]s, no padding
                    [2, 40, 3]]                            # the last, partial row
    for row in rows[:-1]:
        assert len(row) == 8
        for seg in row.segments:
            assert seg[0] == 2 and seg[-1] == 3 and len(seg) >= 3
    with pytest.raises(ValueError, match="seq_len"):
        data.RowPacker(2, cls=2, sep=3)


def test_iter_rows_packs_every_token_into_full_rows(tokenizer):
    rng = np.random.default_rng(0)
    docs = [" ".join(["lists hold items"] * rng.integers(1, 30)) + f" doc {i}" for i in range(100)]
    rows = list(data.iter_rows(docs, tokenizer, 64))
    assert all(len(r) == 64 for r in rows[:-1]) and 0 < len(rows[-1]) <= 64
    special = special_ids(tokenizer)
    packed = [t for r in rows for s in r.segments for t in s.tolist() if t not in special.all]
    expected = [t for e in tokenizer.encode_batch(docs, add_special_tokens=False) for t in e.ids]
    assert packed == expected  # nothing lost, nothing reordered


# --------------------------------------------------------------------------- masking
def _big_batch(tokenizer, rate=0.15, whole_word=False, layout="padded", seed=0, batch_size=48, seq_len=64):
    rows = _rows(tokenizer, n_docs=80, seq_len=seq_len)[:batch_size]
    collator = data.MaskingCollator(tokenizer, seq_len, batch_size, mask_rate=rate, whole_word=whole_word,
                                    layout=layout)
    batch = collator(rows, np.random.default_rng(seed))
    return collator, rows, batch


@pytest.mark.parametrize("rate", [0.15, 0.3])
@pytest.mark.parametrize("whole_word", [False, True])
def test_masking_statistics(tokenizer, rate, whole_word):
    collator, rows, batch = _big_batch(tokenizer, rate=rate, whole_word=whole_word)
    special = collator.special
    original = np.full((48, 64), special.pad)
    for r, row in enumerate(rows):
        flat = np.concatenate(row.segments)
        original[r, :len(flat)] = flat
    original = original.reshape(-1)
    labels, inputs = batch.labels.reshape(-1).numpy(), batch.input_ids.reshape(-1).numpy()
    pos = batch.masked_positions.numpy()
    chosen = pos[pos >= 0]
    # static, sorted, -1-padded index; labels are the original tokens exactly there
    assert pos.shape == (data.masked_slots(48, 64, rate),) and (pos[len(chosen):] == -1).all()
    assert (np.diff(chosen) > 0).all() and batch.n_masked == len(chosen)
    assert (np.flatnonzero(labels != -100) == chosen).all() and (labels[chosen] == original[chosen]).all()
    # no special token is ever chosen, and unchosen tokens are untouched
    assert not np.isin(original[chosen], special.all).any()
    rest = np.setdiff1d(np.arange(len(original)), chosen)
    assert (inputs[rest] == original[rest]).all()
    # the rate, of the maskable tokens (whole words round down to fit the budget)
    maskable = (~np.isin(original, special.all)).sum()
    assert rate * maskable - (20 if whole_word else 1) <= len(chosen) <= rate * maskable + 1
    # 80/10/10, within 4 standard deviations of a binomial draw
    n = len(chosen)
    masked = (inputs[chosen] == special.mask).sum()
    kept = (inputs[chosen] == original[chosen]).sum()
    for observed, p in ((masked, 0.8), (kept, 0.1 + 0.1 / len(collator.random_ids))):
        assert abs(observed - p * n) <= 4 * np.sqrt(n * p * (1 - p)) + 1, (observed, p, n)
    replaced = inputs[chosen][(inputs[chosen] != special.mask) & (inputs[chosen] != original[chosen])]
    assert not np.isin(replaced, special.all).any()


def test_whole_word_masking_takes_every_piece_of_a_word(tokenizer):
    collator, rows, batch = _big_batch(tokenizer, whole_word=True)
    chosen = batch.labels.reshape(-1).numpy() != -100
    cont = collator.is_continuation
    # a "##" piece is chosen exactly when the token before it is (unless a segment cut the word)
    full = np.full((48, 64), collator.special.pad)
    for r, row in enumerate(rows):
        f = np.concatenate(row.segments)
        full[r, :len(f)] = f
    full = full.reshape(-1)
    pieces = np.flatnonzero(cont[full])
    pieces = pieces[~np.isin(full[pieces - 1], collator.special.all)]
    assert len(pieces) > 50
    assert (chosen[pieces] == chosen[pieces - 1]).all() and chosen[pieces].any()


def test_packed_layout_has_static_shapes_and_segment_boundaries(tokenizer):
    collator, rows, batch = _big_batch(tokenizer, layout="packed")
    assert batch.input_ids.shape == (48 * 64,) and batch.attention_mask is None
    cu = batch.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 48 * 64
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert max(lengths) == batch.max_seqlen <= 64 and min(lengths) > 0
    # every segment starts with [CLS] unless it is a row's padding
    starts = batch.input_ids[cu[:-1].long()]
    assert set(starts.tolist()) <= {collator.special.cls, collator.special.pad}
    n_segments = sum(len(r.segments) for r in rows)
    assert (starts == collator.special.cls).sum() == n_segments


def test_batch_without_maskable_tokens(tokenizer):
    collator = data.MaskingCollator(tokenizer, 16, 4)
    special = collator.special
    batch = collator([data.Row([np.array([special.cls, special.sep])])], np.random.default_rng(0))
    assert batch.n_masked == 0 and (batch.masked_positions == -1).all() and (batch.labels == -100).all()
    assert batch.input_ids.shape == (4, 16) and batch.n_tokens == 2
    assert batch.attention_mask.sum() == 2 and "attention_mask" in batch.model_inputs()
    with pytest.raises(ValueError, match="mask_rate"):
        data.MaskingCollator(tokenizer, 16, 4, mask_rate=0.0)
    with pytest.raises(ValueError, match="does not fit"):
        collator([data.Row([np.arange(5, 25)])], np.random.default_rng(0))


# --------------------------------------------------------------------------- streams
def test_stream_restarted_at_a_position_continues_identically(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    docs = list(itertools.islice(read_documents([bundled_corpus("train")]), 60))
    path.write_text("\n\n".join(docs))
    collator = data.MaskingCollator(tokenizer, 32, 8)
    make = lambda start: data.BatchStream([path], tokenizer, collator, seed=3, shuffle_rows=16, start=start)  # noqa
    first = list(itertools.islice(make(0), 30))  # runs past an epoch boundary
    stream = make(17)
    resumed = list(itertools.islice(stream, 13))
    assert stream.position == 30
    for a, b in zip(first[17:], resumed):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.masked_positions, b.masked_positions)
    # different epochs shuffle differently; batches differ
    assert not torch.equal(first[0].input_ids, first[1].input_ids)


def test_stream_efficiency_and_sharding(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    path.write_text("\n\n".join(f"doc {i} " + " ".join(["lists hold items"] * rng.integers(1, 6)) for i in range(400)))
    collator = data.MaskingCollator(tokenizer, 32, 4)
    stream = data.BatchStream([path], tokenizer, collator, shuffle_rows=8)
    batches = list(itertools.islice(stream, 10))
    assert stream.efficiency > 0.85
    assert stream.efficiency == pytest.approx(sum(b.n_tokens for b in batches) / (10 * 4 * 32))
    r0 = next(iter(data.BatchStream([path], tokenizer, collator, rank=0, world_size=2, shuffle_rows=8)))
    r1 = next(iter(data.BatchStream([path], tokenizer, collator, rank=1, world_size=2, shuffle_rows=8)))
    assert not torch.equal(r0.input_ids, r1.input_ids)


def test_validation_data_without_text_is_an_error(tokenizer, tmp_path):
    (tmp_path / "valid.txt").write_text("\n\n")
    collator = data.MaskingCollator(tokenizer, 32, 4)
    with pytest.warns(CorpusWarning, match="holds no text"):
        with pytest.raises(ValueError, match=r"the validation data \(.*valid.txt.*\) holds no text for rank 0"):
            data.eval_batches([tmp_path / "valid.txt"], tokenizer, collator)


def test_unigram_baseline_by_hand():
    counts = np.array([0, 0, 0, 0, 0, 6, 2, 0])  # token 5 most frequent
    batch = data.Batch(input_ids=torch.zeros(4, dtype=torch.long), labels=torch.tensor([5, -100, 6, 5]),
                       masked_positions=torch.tensor([0, 2, 3]))
    out = data.unigram_baseline(counts, [batch])
    probs = (counts + 1) / (counts + 1).sum()
    assert out["accuracy"] == pytest.approx(2 / 3) and out["n_masked"] == 3
    assert out["perplexity"] == pytest.approx(np.exp(-(2 * np.log(probs[5]) + np.log(probs[6])) / 3))


# --------------------------------------------------------------------------- resuming a stream without replaying epochs
def test_stream_counts_its_epochs_and_a_restart_skips_whole_epochs(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(itertools.islice(read_documents([bundled_corpus("train")]), 6)))
    collator = data.MaskingCollator(tokenizer, 32, 8)
    make = lambda **kw: data.BatchStream([path], tokenizer, collator, seed=3, shuffle_rows=16, **kw)  # noqa: E731
    stream = make()
    first = list(itertools.islice(stream, 40))
    per_epoch = stream.epoch_batches
    assert per_epoch is not None and 2 <= per_epoch <= 15  # the test runs past two epoch ends
    start = 2 * per_epoch + 1  # inside the third epoch

    reads = []
    real_read = data.read_documents
    monkeypatch.setattr(data, "read_documents", lambda *a, **k: reads.append(1) or real_read(*a, **k))
    resumed = iter(make(start=start, epoch_batches=per_epoch))
    again = [next(resumed)]
    assert len(reads) == 1  # the first two epochs were not read again
    again += itertools.islice(resumed, 40 - start - 1)
    for a, b in zip(first[start:], again):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.masked_positions, b.masked_positions)
    reads.clear()
    list(itertools.islice(make(start=start), 1))  # without the count: every epoch up to there is re-read
    assert len(reads) == 3


# --------------------------------------------------------------------------- the held-out validation slice
def test_held_out_slice_is_fixed_disjoint_and_never_empty(tmp_path):
    from fastmlm.corpus_reader import HeldOut, split_holdout

    docs = [f"document {i}: lists hold items and tuples hold {i} values" for i in range(400)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:200]))
    (tmp_path / "b.txt").write_text("\n\n".join(docs[200:]))
    train, valid = split_holdout([tmp_path / "a.txt", tmp_path / "b.txt"], 0.05)
    t, v = list(read_documents(train)), list(read_documents(valid))
    assert sorted(t + v) == sorted(docs) and not set(t) & set(v)
    assert docs[0] in v and 5 <= len(v) <= 45  # the first document, and about 5% by hash
    # the same slice whatever the file order or the folder: each document's own text decides
    _, swapped = split_holdout([tmp_path / "b.txt", tmp_path / "a.txt"], 0.05)
    assert set(read_documents(swapped)) - {docs[200]} == set(v) - {docs[0]}
    # never empty: a corpus too small for a hash share still holds out its first document
    (tmp_path / "small.txt").write_text("one document\n\nand another")
    assert list(read_documents(HeldOut((tmp_path / "small.txt",), "valid", 0.001))) == ["one document"]
    # ranks share the slice out
    shards = [list(read_documents(valid, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(v)
    assert "held-out validation slice (5% of the documents)" in str(valid)
    with pytest.raises(ValueError, match="held-out fraction"):
        HeldOut((tmp_path / "a.txt",), "valid", 0.0)


def test_training_sources_follow_the_config(tmp_path):
    from fastmlm.corpus_reader import HeldOut, training_sources

    assert training_sources(None, None, 0.01) == ([bundled_corpus("train")], [bundled_corpus("valid")])
    assert training_sources(["t.txt"], ["v.txt"], 0.01) == (["t.txt"], ["v.txt"])
    train, valid = training_sources(["t.txt"], None, 0.01)
    assert isinstance(train, HeldOut) and (train.part, valid.part) == ("train", "valid")
    assert training_sources(["t.txt"], None, 0.0) == (["t.txt"], None)


def test_eval_batches_reads_only_what_max_batches_needs(tokenizer, tmp_path):
    collator = data.MaskingCollator(tokenizer, 32, 4)
    everything = data.eval_batches([bundled_corpus("valid")], tokenizer, collator)
    some = data.eval_batches([bundled_corpus("valid")], tokenizer, collator, max_batches=3)
    assert len(some) == 3 and len(everything) > 3
    for a, b in zip(everything, some):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


# --------------------------------------------------------------------------- bad input, refused by name
def test_collator_arguments_are_checked_nan_included(tokenizer):
    for kwargs, error, message in [
        (dict(mask_prob=float("nan")), ValueError, "mask_prob and random_prob .* got mask_prob=nan"),
        (dict(random_prob=float("nan")), ValueError, "got mask_prob=0.8, random_prob=nan"),
        (dict(mask_rate="0.15"), TypeError, "mask_rate must be a number, got '0.15'"),
        (dict(seq_len=2), ValueError, r"seq_len must be an int >= 3 \(\[CLS\] x \[SEP\]\), got 2"),
        (dict(seq_len=8.0), ValueError, "seq_len must be an int >= 3 .*got 8.0"),
        (dict(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    ]:
        with pytest.raises(error, match=message):
            data.MaskingCollator(tokenizer, **{"seq_len": 16, "batch_size": 4, **kwargs})


def test_collator_refuses_token_ids_outside_the_vocabulary(tokenizer):
    collator = data.MaskingCollator(tokenizer, 16, 2)
    special = collator.special
    for bad in (600, -1):  # 600: an IndexError inside numpy before; -1: silently the last token of the vocabulary
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the tokenizer's vocabulary of 600"):
            collator([data.Row([np.array([special.cls, 50, bad, special.sep])])], np.random.default_rng(0))
    with pytest.raises(TypeError, match="token ids must be integers, got dtype float64"):  # 50.7 became 50
        collator([data.Row([np.array([special.cls, 50.7, special.sep])])], np.random.default_rng(0))


def test_text_spelling_pad_is_text_not_padding(tokenizer):
    # "[PAD]" in a document tokenises to the [PAD] id (special tokens are matched in text); padding is
    # where a row ends, so that token is attended to and counted like the rest of its row.
    rows = list(data.iter_rows(["lists hold [PAD] items"], tokenizer, 16))
    ids = np.concatenate(rows[0].segments)
    assert (ids == special_ids(tokenizer).pad).sum() == 1
    batch = data.MaskingCollator(tokenizer, 16, 2)(rows, np.random.default_rng(0))
    assert batch.attention_mask[0].tolist() == [True] * len(ids) + [False] * (16 - len(ids))
    assert batch.n_tokens == len(ids) and not batch.attention_mask[1].any()


def test_a_str_is_not_a_list_of_documents(tokenizer):
    # before: every character was a document of its own, silently
    with pytest.raises(TypeError, match=r"documents must be an iterable of str .* got a str; wrap it: \[text\]"):
        list(data.iter_rows("lists hold items", tokenizer, 16))
    with pytest.raises(TypeError, match="documents must be an iterable of str"):
        train_tokenizer("lists hold items " * 50, vocab_size=200)


def test_train_tokenizer_argument_types():
    with pytest.raises(ValueError, match="vocab_size must be an int of at least 105, got 200.0"):
        train_tokenizer(["a b c"], vocab_size=200.0)
    with pytest.raises(ValueError, match="min_frequency must be an int >= 0, got -1"):  # an OverflowError in Rust
        train_tokenizer(["a b c"], vocab_size=200, min_frequency=-1)


def test_load_tokenizer_json_refuses_lowercase_it_would_ignore(tokenizer, tmp_path):
    path = _save(tokenizer, tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"lowercase=False applies to a vocab.txt only; .*tokenizer.json carries"):
        load_tokenizer(path, lowercase=False)  # before: a lowercasing tokenizer, silently
    assert load_tokenizer(path).get_vocab_size() == 600


def test_whole_word_masking_needs_a_tokenizer_that_marks_word_pieces():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + ["a", "b", "ab"])}
    bpe = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    data.MaskingCollator(bpe, 16, 2)  # token masking works with any model
    with pytest.raises(ValueError, match="whole-word masking needs a tokenizer that marks .* model is BPE"):
        data.MaskingCollator(bpe, 16, 2, whole_word=True)  # before: silently token masking


def test_stream_and_eval_arguments_are_checked(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("lists hold items\n\ntuples hold values")
    collator = data.MaskingCollator(tokenizer, 16, 2)
    for kwargs, message in [(dict(shuffle_rows=0), "shuffle_rows must be an int >= 1, got 0"),  # numpy's "high <= 0"
                            (dict(seed=-1), "seed must be an int >= 0, got -1"),  # numpy's "expected non-negative"
                            (dict(start=-3), "start must be an int >= 0, got -3")]:
        with pytest.raises(ValueError, match=message):
            data.BatchStream([path], tokenizer, collator, **kwargs)
    # max_batches=0 used to read nothing and then say the validation data held no text
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"max_batches must be an int >= 1 \(or None: every batch\), got {bad}"):
            data.eval_batches([path], tokenizer, collator, max_batches=bad)


def test_read_documents_checks_rank_and_world_size(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("one\n\ntwo\n\nthree")
    assert list(read_documents([path], rank=1, world_size=2)) == ["two"]
    for rank, world_size in ((0, 0), (2, 2), (-1, 2)):  # a ZeroDivisionError; no documents at all (silently)
        with pytest.raises(ValueError, match=rf"0 <= rank < world_size, got rank={rank}, world_size={world_size}"):
            list(read_documents([path], rank=rank, world_size=world_size))


def test_a_file_given_twice_is_refused_not_read_twice(tmp_path):
    from fastmlm.corpus_reader import corpus_files, split_holdout

    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.txt").write_text("three")
    assert list(read_documents([tmp_path / "a.txt", tmp_path / "b.txt"])) == ["one", "two", "three"]
    for paths in ([tmp_path / "a.txt", tmp_path / "a.txt"], [tmp_path, tmp_path / "b.txt"]):
        with pytest.raises(ValueError, match=r"\.txt is given twice .*its documents would be read twice"):
            corpus_files(paths)
    with pytest.raises(TypeError, match="paths must be a file or folder or a list of them, got None"):
        corpus_files(None)
    with pytest.raises(TypeError, match="the held-out fraction must be a number, got '0.1'"):
        split_holdout([tmp_path], "0.1")


def test_masking_rate_and_80_10_10_over_many_batches(tokenizer):
    """Over 150 batches of a fixed seed: the share of maskable tokens chosen is mask_rate, and the chosen
    ones split 80/10/10, each within 4 standard deviations of its distribution."""
    rows = _rows(tokenizer, n_docs=150, seq_len=64)
    for whole_word in (False, True):
        collator = data.MaskingCollator(tokenizer, 64, 16, mask_rate=0.15, whole_word=whole_word)
        special, n_random = collator.special, len(collator.random_ids)
        n_batches, maskable, chosen, masked, kept, replaced = 150, 0, 0, 0, 0, 0
        for i in range(n_batches):
            picked = np.random.default_rng([7, i]).choice(len(rows), 16, replace=False)
            batch = collator([rows[j] for j in picked], data.batch_rng(7, i))
            original = np.full((16, 64), special.pad)
            for r, j in enumerate(picked):
                flat = np.concatenate(rows[j].segments)
                original[r, :len(flat)] = flat
            original, inputs = original.reshape(-1), batch.input_ids.reshape(-1).numpy()
            pos = batch.masked_positions.numpy()
            pos = pos[pos >= 0]
            assert not np.isin(original[pos], special.all).any()  # never a special token chosen
            maskable += int((~np.isin(original, special.all)).sum())
            chosen += len(pos)
            masked += int((inputs[pos] == special.mask).sum())
            kept += int((inputs[pos] == original[pos]).sum())
            other = inputs[pos][(inputs[pos] != special.mask) & (inputs[pos] != original[pos])]
            assert not np.isin(other, special.all).any()  # never a special token as the replacement
            replaced += len(other)
        # Each batch chooses floor(rate * m + u) of its m maskable tokens, u ~ U(0, 1): the sum is rate * maskable
        # on average, with a variance of at most 1/4 per batch.
        assert abs(chosen - 0.15 * maskable) <= 4 * np.sqrt(n_batches / 4), (whole_word, chosen, 0.15 * maskable)
        # Given the chosen ones: [MASK] with p 0.8, unchanged 0.1 (+ a random token that is the original), else
        # another token; binomial counts.
        for observed, p in ((masked, 0.8), (kept, 0.1 + 0.1 / n_random), (replaced, 0.1 * (1 - 1 / n_random))):
            assert abs(observed - p * chosen) <= 4 * np.sqrt(chosen * p * (1 - p)), (whole_word, observed, p, chosen)


def test_jsonl_nested_too_deeply_is_a_value_error_naming_the_line(tmp_path):
    (tmp_path / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl:2: not valid JSON for a corpus \(nested too deeply"):
        list(read_documents([tmp_path / "deep.jsonl"]))  # before: a RecursionError from json


def test_documents_that_are_not_str_are_refused_by_number(tokenizer):
    # before: a None ended iter_rows' documents silently (it was its end marker); bytes failed inside tokenizers
    with pytest.raises(TypeError, match=r"documents must be str, got NoneType \(document 1\)"):
        list(data.iter_rows(["lists hold items", None, "tuples hold values"], tokenizer, 16))
    with pytest.raises(TypeError, match=r"documents must be str, got bytes \(document 0\)"):
        list(data.iter_rows([b"lists"], tokenizer, 16))
    with pytest.raises(TypeError, match=r"documents must be str, got int \(document 1\)"):
        train_tokenizer(["lists hold items", 5], vocab_size=200)
