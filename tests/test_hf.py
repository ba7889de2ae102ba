"""fastmlm.hf: a Hugging Face BertForMaskedLM and the fastmlm model holding its weights agree
(hidden states, masked logits, loss, gradients); export / import round trips are exact; bad
checkpoints get clear errors. Everything is built locally from random weights (no hub)."""
import json
import pathlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertModel  # noqa: E402

from fastmlm.hf import CheckpointError, load_hf, save_hf, state_dict_from_hf  # noqa: E402
from fastmlm.model import FastMLMForMaskedLM  # noqa: E402
from fastmlm.config import preset  # noqa: E402

VOCAB = 123  # not a multiple of 8


def hf_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=70,
                  max_position_embeddings=40, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.1)
    return BertConfig(**{**fields, **overrides})


def hf_mlm(**overrides):
    """A random BertForMaskedLM in eval mode, with non-trivial LayerNorm parameters and biases."""
    model = BertForMaskedLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def batch(padding: str, seqlen: int = 17, size: int = 3):
    """ids, mask (None without padding) and labels (-100 = not masked; never at padding)."""
    lengths = torch.tensor([seqlen, 5, 11][:size]) if padding != "none" else torch.full((size,), seqlen)
    cols = torch.arange(seqlen)[None, :]
    mask = cols < lengths[:, None] if padding != "left" else cols >= seqlen - lengths[:, None]
    ids = torch.randint(1, VOCAB, (size, seqlen)) * mask
    masked = (torch.rand(ids.shape) < 0.25) & mask
    masked[torch.arange(size), mask.float().argmax(1)] = True  # at least one per row
    return ids, (None if padding == "none" else mask), torch.where(masked, ids, -100)


def exported(model, tmp_path, name="hf"):
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_matches_transformers_outputs(tmp_path, padding, act):
    hf = hf_mlm(hidden_act=act)
    ours = load_hf(exported(hf, tmp_path)).eval()
    ids, mask, labels = batch(padding)
    with torch.no_grad():
        expected = hf(ids, attention_mask=None if mask is None else mask.long(), labels=labels,
                      output_hidden_states=True)
        got = ours(ids, attention_mask=mask, labels=labels)
        positions = (labels.reshape(-1) != -100).nonzero()[:, 0]
        logits = ours.masked_logits(ids, attention_mask=mask, positions=positions)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    # within fp32 rounding: the same math, summed in a different order
    torch.testing.assert_close(got.hidden_states[real], expected.hidden_states[-1][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected.logits.reshape(-1, VOCAB)[positions], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-6)


def _hf_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# fp64 is not exact either: the loss is fp32 by contract, so its gradient carries fp32 rounding.
@pytest.mark.parametrize("dtype,backend,tol", [(torch.float64, "reference", 1e-6), (torch.float32, "torch", 1e-4)])
def test_gradients_match_transformers(tmp_path, dtype, backend, tol):
    hf = hf_mlm()
    ours = load_hf(exported(hf, tmp_path), attention_backend=backend, loss_backend=backend).eval().to(dtype)
    hf = hf.to(dtype)
    ids, mask, labels = batch("right")
    hf(ids, attention_mask=mask.long(), labels=labels).loss.backward()
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    expected, _ = state_dict_from_hf(_hf_grads(hf), ours.config)  # HF names -> ours, q/k/v fused
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert set(got) == set(expected)
    for name, g in expected.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(got[name], g, atol=tol * max(scale, 1e-3), rtol=tol, msg=name)


def test_round_trip_export_transformers_import_is_exact(tmp_path):
    ours = FastMLMForMaskedLM(preset("tiny", vocab_size=VOCAB, hidden_size=48, num_heads=3, intermediate_size=70,
                                     max_position_embeddings=40, activation="gelu_tanh"))
    save_hf(ours, tmp_path / "out")
    hf, info = BertForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert hf.config.hidden_act == "gelu_pytorch_tanh" and hf.config.num_hidden_layers == 2
    assert torch.equal(hf.cls.predictions.decoder.weight, ours.embeddings.word.weight.detach())
    hf.save_pretrained(tmp_path / "back")
    back = load_hf(tmp_path / "back")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    ids, mask, labels = batch("right")
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids, attention_mask=mask.long(), labels=labels).loss,
                                   ours.eval()(ids, attention_mask=mask, labels=labels).loss, atol=1e-6, rtol=1e-6)


def test_pytorch_model_bin_and_bert_model_checkpoints(tmp_path):
    hf = hf_mlm()
    reference = load_hf(exported(hf, tmp_path))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(hf.config.to_json_string())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")  # includes the tied decoder copies
    from_bin = load_hf(bin_dir)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(from_bin.state_dict()[name], tensor), name

    encoder = BertModel(hf_config()).eval()  # no MLM head, a pooler, no "bert." prefix
    encoder.save_pretrained(tmp_path / "encoder")
    with pytest.warns(UserWarning, match=r"encoder has no MLM head .* the MLM head is randomly initialised"):
        ours = load_hf(tmp_path / "encoder").eval()
    ids, mask, _ = batch("right")
    with torch.no_grad():
        expected = encoder(ids, attention_mask=mask.long())
        got = ours(ids, attention_mask=mask)
    torch.testing.assert_close(got.hidden_states[mask], expected.last_hidden_state[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_pooler_survives_import_and_export(tmp_path, padding):
    """BertModel -> fastmlm -> export: BertModel and BertForMaskedLM load it; pooler output unchanged."""
    encoder = BertModel(hf_config()).eval()
    with torch.no_grad():
        encoder.pooler.dense.bias.normal_()
    encoder.save_pretrained(tmp_path / "encoder")
    with pytest.warns(UserWarning, match="has no MLM head"):
        ours = load_hf(tmp_path / "encoder").eval()
    assert ours.pooler is not None
    save_hf(ours, tmp_path / "out")
    again, info = BertModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"], info  # it has no MLM head: at most the head keys are left unused
    assert all(k.startswith("cls.predictions.") for k in info["unexpected_keys"]), info
    mlm, info = BertForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"], info  # it has no pooler: at most the pooler keys are left unused
    assert all("pooler" in k for k in info["unexpected_keys"]), info
    ids, mask, labels = batch(padding)
    hf_mask = None if mask is None else mask.long()
    with torch.no_grad():
        expected = encoder(ids, attention_mask=hf_mask).pooler_output
        torch.testing.assert_close(ours(ids, attention_mask=mask).pooler_output, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again.eval()(ids, attention_mask=hf_mask).pooler_output, expected,
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mlm.eval()(ids, attention_mask=hf_mask, labels=labels).loss,
                                   ours(ids, attention_mask=mask, labels=labels).loss, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the export has an MLM head now: no warning
        back = load_hf(tmp_path / "out")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_unknown_missing_and_untied_keys_are_listed(tmp_path):
    hf = hf_mlm()
    state = hf.state_dict()
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(hf.config.to_json_string())

    def save(tensors):
        torch.save(tensors, folder / "pytorch_model.bin")

    broken = dict(state)
    broken["bert.encoder.layer.0.attention.self.rotary.inv_freq"] = torch.zeros(4)
    del broken["bert.encoder.layer.1.output.dense.bias"], broken["cls.predictions.transform.dense.weight"]
    save(broken)
    with pytest.raises(CheckpointError, match=r"(?s)unknown keys: \['bert\.encoder\.layer\.0\.attention\.self\.rotary"
                                              r".*missing keys: \['bert\.encoder\.layer\.1\.output\.dense\.bias', "
                                              r"'cls\.predictions\.transform\.dense\.weight'\]"):
        load_hf(folder)

    untied = dict(state)
    untied["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1
    save(untied)
    with pytest.raises(CheckpointError, match="cannot load an untied MLM decoder"):
        load_hf(folder)

    save({"bert.embeddings.word_embeddings.weight": [1, 2]})
    with pytest.raises(CheckpointError, match="does not hold a flat dict of tensors"):
        load_hf(folder)
    save({"bert.embeddings.word_embeddings.weight": pathlib.PurePosixPath("a")})  # a pickle weights_only refuses
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        load_hf(folder)


def test_bad_files_and_configs(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_hf(tmp_path)
    folder = exported(hf_mlm(), tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_hf(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_hf(folder)

    config = json.loads((folder / "config.json").read_text())
    for change, message in [
        (dict(position_embedding_type="relative_key"), "only 'absolute' is supported"),
        (dict(model_type="roberta"), "only 'bert' checkpoints"),
        (dict(hidden_act="swish"), "hidden_act='swish'"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings is false"),
    ]:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            load_hf(folder)


def test_config_json_that_is_not_a_bert_config_is_a_clear_error(tmp_path):
    folder = exported(hf_mlm(), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"config.json is a file; expected a Hugging Face checkpoint directory"):
        load_hf(folder / "config.json")
    for text, message in [("[1, 2]", r"config.json holds \[1, 2\]; expected a JSON object of config fields"),
                          ("null", "config.json holds null; expected a JSON object")]:
        (folder / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=message):
            load_hf(folder)
    for change, message in [  # each was a KeyError / TypeError from inside config_from_hf
        ({"vocab_size": None}, "vocab_size is missing"),
        ({"num_hidden_layers": None, "intermediate_size": None}, "(?s)num_hidden_layers is missing.*intermediate_size"),
        ({"hidden_act": ["gelu"]}, r"hidden_act=\['gelu'\]; supported"),
    ]:
        edited = {k: v for k, v in {**config, **change}.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=message):
            load_hf(folder)


def test_config_overrides_may_not_change_what_the_checkpoint_computes(tmp_path):
    folder = exported(hf_mlm(), tmp_path)
    for overrides, shown in [(dict(activation="relu"), "activation='gelu'"),
                             (dict(num_heads=6, layer_norm_eps=1e-5), "num_heads=3, layer_norm_eps=1e-12")]:
        with pytest.raises(CheckpointError, match=rf"config overrides .* would change what the checkpoint computes "
                                                  rf"\(its config gives {shown}\)"):
            load_hf(folder, **overrides)  # was: loaded, computing another function without a warning
    model = load_hf(folder, attention_backend="torch", hidden_dropout=0.0, num_heads=3)  # the same value is fine
    assert model.config.attention_backend == "torch" and model.config.hidden_dropout == 0.0


def test_bad_query_key_value_shapes_and_shard_indexes_are_clear_errors(tmp_path):
    hf = hf_mlm()
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(hf.config.to_json_string())
    state = hf.state_dict()
    key = "bert.encoder.layer.1.attention.self.key.bias"
    torch.save({**state, key: state[key][:, None]}, folder / "pytorch_model.bin")  # was torch.cat's RuntimeError
    with pytest.raises(CheckpointError, match=r"self.key.bias, .* have shapes \[\(48,\), \(48, 1\), \(48,\)\]; "
                                              "query, key and value must have one shape"):
        load_hf(folder)
    (folder / "pytorch_model.bin").unlink()
    index = folder / "model.safetensors.index.json"
    (tmp_path / "outside.safetensors").write_bytes(b"")  # a file, but outside the checkpoint folder
    for text, message in [('{"weight_map": {"a": 5}}', 'not a valid shard index: expected "weight_map": an object'),
                          ('[1]', "not a valid shard index"),
                          ('{"weight_map": {"a": "gone.safetensors"}}', "names the shard gone.safetensors, which is "
                                                                        "not a file in"),
                          ('{"weight_map": {"a": "../outside.safetensors"}}', "names the shard ../outside.safetensors")]:
        index.write_text(text)
        with pytest.raises(CheckpointError, match=message):
            load_hf(folder)


def test_attention_dropout_is_dropped_with_a_warning(tmp_path):
    folder = exported(hf_mlm(attention_probs_dropout_prob=0.1), tmp_path)
    with pytest.warns(UserWarning, match="attention_probs_dropout_prob=0.1 is dropped"):
        model = load_hf(folder)
    assert model.config.attention_dropout == 0.0 and model.config.hidden_dropout == 0.1


def test_save_hf_refuses_an_existing_file_or_a_non_empty_folder(tmp_path):
    model = FastMLMForMaskedLM(preset("tiny"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"output directory {tmp_path / 'file'} is an existing file"):
        save_hf(model, tmp_path / "file")
    save_hf(model, tmp_path / "empty")  # new
    with pytest.raises(ValueError, match=f"output directory {tmp_path / 'empty'} is not empty"):
        save_hf(model, tmp_path / "empty")
    (tmp_path / "made").mkdir()
    assert (save_hf(model, tmp_path / "made") / "model.safetensors").is_file()  # existing but empty


def test_save_hf_and_save_hf_classifier_name_the_other_for_the_other_model(tmp_path):
    from fastmlm.finetune import SequenceClassifier
    from fastmlm.hf import save_hf_classifier

    model = FastMLMForMaskedLM(preset("tiny"))
    with pytest.raises(ValueError, match="save_hf_classifier: model must be a fastmlm.finetune SequenceClassifier or "
                                         r"TokenClassifier, got FastMLMForMaskedLM \(an MLM model: use save_hf\)"):
        save_hf_classifier(model, tmp_path / "a")  # was AttributeError: no attribute 'kind'
    classifier = SequenceClassifier(model, ["x", "y"])
    with pytest.raises(ValueError, match=r"save_hf: model must be a FastMLMForMaskedLM, got SequenceClassifier \(a "
                                         r"fastmlm.finetune classifier: use save_hf_classifier\)"):
        save_hf(classifier, tmp_path / "b")  # was AttributeError: no attribute 'head'
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(CheckpointError, match=r"(?s)unknown keys: \['classifier.bias', 'classifier.weight'\].*"
                                              "fastmlm.hf.load_hf_encoder reads its encoder"):
        load_hf(save_hf_classifier(classifier, tmp_path / "c"))


def test_save_hf_tokenizer_refuses_what_a_bert_tokenizer_folder_cannot_hold(tmp_path):
    from tokenizers import Tokenizer, models

    from fastmlm.hf import save_hf_tokenizer

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(special + ["a"])}, unk_token="[UNK]"))
    for bad in (0, "512", True):  # was written into tokenizer_config.json as it was
        with pytest.raises(ValueError, match=f"model_max_length must be a positive int .*, got {bad!r}"):
            save_hf_tokenizer(wordpiece, tmp_path, bad)
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(special + ["a"])}, merges=[], unk_token="[UNK]"))
    with pytest.raises(ValueError, match="writes a BERT \\(WordPiece\\) tokenizer; got a BPE one"):
        save_hf_tokenizer(bpe, tmp_path, 512)  # was: vocab.json + merges.txt under a BertTokenizer config
    assert not any(tmp_path.iterdir())
    save_hf_tokenizer(wordpiece, tmp_path, 512)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 512


def test_export_refuses_what_bert_cannot_express(tmp_path):
    for overrides, message in [(dict(norm_position="pre"), "post-norm"),
                               (dict(attention_pattern=("dense", "window:8")), "attends densely")]:
        with pytest.raises(CheckpointError, match=message):
            save_hf(FastMLMForMaskedLM(preset("tiny", **overrides)), tmp_path)


@pytest.mark.parametrize("lowercase", [True, False])
def test_exported_tokenizer_files_load_in_transformers_with_the_same_ids(tmp_path, lowercase):
    from fastmlm.hf import save_hf_tokenizer
    from fastmlm.tokenizer import train_tokenizer

    docs = ["The Quick brown fox jumps over the lazy dog.", "A quick Brown dog naps; the fox runs off!"] * 20
    ours = train_tokenizer(docs, vocab_size=120, lowercase=lowercase)
    save_hf_tokenizer(ours, tmp_path, model_max_length=37)
    text, pair = "The QUICK fox, unseen-word naps.", "a [MASK] runs"
    body = [ours.encode(t, add_special_tokens=False).ids for t in (text, pair)]
    cls_id, sep_id = ours.token_to_id("[CLS]"), ours.token_to_id("[SEP]")
    # AutoTokenizer and BertTokenizer (transformers 5 adds BERT's template itself); PreTrainedTokenizerFast
    # reads tokenizer.json as it is, as transformers 4's BertTokenizerFast and the tokenizers library do
    for cls in (transformers.AutoTokenizer, transformers.BertTokenizer, transformers.PreTrainedTokenizerFast):
        theirs = cls.from_pretrained(tmp_path)
        assert theirs.model_max_length == 37 and theirs.mask_token == "[MASK]"
        assert theirs(text)["input_ids"] == [cls_id, *body[0], sep_id], cls.__name__  # the rows fastmlm builds
        assert theirs(text, pair)["input_ids"] == [cls_id, *body[0], sep_id, *body[1], sep_id], cls.__name__
        types = theirs(text, pair, return_token_type_ids=True)["token_type_ids"]
        assert types == [0] * (len(body[0]) + 2) + [1] * (len(body[1]) + 1), cls.__name__
    assert ours.post_processor is None  # the caller's tokenizer is not changed
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["do_lower_case"] is lowercase
