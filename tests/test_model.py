"""fastmlm.model: layouts (padded / packed / masked_positions), the MLM loss, backends,
block-sparse patterns, save / load. Edge cases and bad inputs are in test_model_inputs.py, Hugging Face
equivalence in test_hf.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastmlm.config import preset
from fastmlm.model import FastMLMForMaskedLM, MLMOutput
from helpers import cu_seqlens_of
from model_fixtures import SMALL, make_batch, make_model, run


# --------------------------------------------------------------------------- the loss
def test_loss_equals_cross_entropy_of_masked_logits():
    model = make_model()
    ids, mask, labels = make_batch([13, 4, 9], 13)
    out = model(ids, attention_mask=mask, labels=labels)
    assert isinstance(out, MLMOutput) and out.loss.dtype == torch.float32 and out.loss.dim() == 0
    positions = (labels.reshape(-1) != -100).nonzero()[:, 0]
    logits = model.masked_logits(ids, attention_mask=mask, positions=positions)
    targets = labels.reshape(-1)[positions]
    torch.testing.assert_close(out.loss.double(), F.cross_entropy(logits.double(), targets), atol=1e-6, rtol=1e-6)
    assert out.n_masked.item() == positions.numel() and out.n_masked.dtype == torch.int64
    assert out.n_correct.item() == (logits.argmax(-1) == targets).sum().item()
    summed = model(ids, attention_mask=mask, labels=labels, loss_reduction="sum").loss
    torch.testing.assert_close(summed, out.loss * positions.numel())


def test_hidden_states_are_zero_at_padding_and_independent_of_it():
    model = make_model()
    ids, mask, _ = make_batch([11, 5], 11)
    hidden = model(ids, attention_mask=mask).hidden_states
    assert hidden.shape == (2, 11, 32) and (hidden[~mask] == 0).all()
    other = ids.clone()
    other[~mask] = 77  # what sits under the padding must not matter
    torch.testing.assert_close(model(other, attention_mask=mask).hidden_states, hidden)
    alone = model(ids[1:2, :5]).hidden_states  # the short row, without padding
    torch.testing.assert_close(hidden[1:2, :5], alone)


def test_packed_input_equals_padded_input():
    model = make_model()
    lengths = [9, 3, 0, 7]
    ids, mask, labels = make_batch(lengths, 9)
    padded = model(ids, attention_mask=mask, labels=labels)
    cu = cu_seqlens_of(lengths)
    packed = model(ids[mask], labels=labels[mask], cu_seqlens=cu, max_seqlen=9)
    assert packed.hidden_states.shape == (sum(lengths), 32)
    torch.testing.assert_close(packed.hidden_states, padded.hidden_states[mask])
    torch.testing.assert_close(packed.loss, padded.loss)
    assert packed.n_masked.item() == padded.n_masked.item()


def test_masked_positions_equal_labels_only_and_ignore_pads():
    model = make_model()
    ids, mask, labels = make_batch([10, 6, 8], 10)
    reference, ref_grads = run(model, ids, attention_mask=mask, labels=labels)
    found = (labels.reshape(-1) != -100).nonzero()[:, 0]
    # a static-length list: -1 pads and one real token whose label is -100 (not counted)
    unmasked = (labels.reshape(-1) == -100).nonzero()[0]
    positions = torch.cat([found, unmasked, torch.full((5,), -1)])[torch.randperm(found.numel() + 6)]
    out, out_grads = run(model, ids, attention_mask=mask, labels=labels, masked_positions=positions)
    torch.testing.assert_close(out.loss, reference.loss)
    assert out.n_masked.item() == found.numel() and out.n_correct.item() == reference.n_correct.item()
    for name in ref_grads:
        torch.testing.assert_close(out_grads[name], ref_grads[name], msg=name)
    # packed input with positions into the packed tokens: no host synchronisation needed
    rows = torch.full((labels.numel(),), -1)
    rows[mask.reshape(-1)] = torch.arange(int(mask.sum()))
    packed = model(ids[mask], labels=labels[mask], cu_seqlens=cu_seqlens_of([10, 6, 8]), max_seqlen=10,
                   masked_positions=torch.where(positions >= 0, rows[positions.clamp(min=0)], -1))
    torch.testing.assert_close(packed.loss, reference.loss)


def test_left_padding_and_token_types():
    model = make_model()
    ids, mask, labels = make_batch([8, 8], 8)
    types = torch.randint(0, 2, ids.shape)
    right = model(ids[:, :5], token_type_ids=types[:, :5], labels=labels[:, :5]).hidden_states
    shifted = torch.zeros_like(ids)
    shifted[:, 3:] = ids[:, :5]
    left_mask = (torch.arange(8)[None] >= 3).expand(2, 8)
    left_types = torch.zeros_like(types)
    left_types[:, 3:] = types[:, :5]
    # left padding keeps Hugging Face's convention: positions are the padded columns, so
    # the result differs from right padding only through the position embeddings
    left = model(shifted, attention_mask=left_mask, token_type_ids=left_types).hidden_states[:, 3:]
    assert left.shape == right.shape and not torch.allclose(left, right)
    with torch.no_grad():
        model.embeddings.position.weight.zero_()
    torch.testing.assert_close(model(shifted, attention_mask=left_mask, token_type_ids=left_types).hidden_states[:, 3:],
                               model(ids[:, :5], token_type_ids=types[:, :5]).hidden_states)
    assert not torch.allclose(model(ids[:, :5]).hidden_states, model(ids[:, :5], token_type_ids=types[:, :5]).hidden_states)



def test_pooler_is_dense_tanh_of_each_first_token():
    model = FastMLMForMaskedLM(preset("tiny", **SMALL), pooler=True).eval()
    with torch.no_grad():
        model.pooler.dense.bias.normal_()
    ids, mask, _ = make_batch([7, 3, 0], 7)
    out = model(ids, attention_mask=mask)
    expected = torch.tanh(model.pooler.dense(out.hidden_states[:, 0]))
    expected[2] = 0  # an empty row pools nothing
    assert out.pooler_output.shape == (3, 32)
    torch.testing.assert_close(out.pooler_output, expected)
    packed = model(ids[mask], cu_seqlens=cu_seqlens_of([7, 3, 0]), max_seqlen=7)
    torch.testing.assert_close(packed.pooler_output, expected)
    torch.testing.assert_close(model(ids[:2, :3]).pooler_output[1], expected[1])  # no padding: the dense path
    assert make_model()(ids, attention_mask=mask).pooler_output is None
    with pytest.raises(ValueError, match="pooler must be True or False, got 'yes'"):
        FastMLMForMaskedLM(preset("tiny"), pooler="yes")


def test_dropout_only_in_training():
    model = make_model(hidden_dropout=0.5)
    ids, mask, _ = make_batch([6, 6], 6)
    first, second = model(ids, attention_mask=mask).hidden_states, model(ids, attention_mask=mask).hidden_states
    torch.testing.assert_close(first, second)
    model.train()
    assert not torch.allclose(model(ids, attention_mask=mask).hidden_states, first)


def test_pre_norm_runs_and_learns():
    model = make_model(torch.float32, norm_position="pre", attention_backend="torch")
    assert model.final_norm is not None
    ids, mask, labels = make_batch([12, 7, 10], 12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(ids, attention_mask=mask, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------- backends
FAST_BACKENDS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("triton", None, id="triton", marks=pytest.mark.interpreter),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
]


def _require(backend, sparse):
    """Skip (with the reason) when a kernel backend is not built yet; its own tests cover why."""
    from fastmlm.ops.attention import REGISTRY as ATTENTION
    from fastmlm.ops.block_sparse import REGISTRY as BLOCK_SPARSE
    from fastmlm.ops.masked_ce import REGISTRY as LOSS
    for registry in (ATTENTION, LOSS) + ((BLOCK_SPARSE,) if sparse else ()):
        try:
            registry.module(backend)
        except (ImportError, AttributeError) as exc:
            pytest.skip(f"{registry.op} has no importable {backend} backend ({exc})")


@pytest.mark.parametrize("pattern", [("dense",), ("window:3+global:1", "dense")])
@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_same_result_under_every_backend(backend, device, pattern):
    if backend == "cuda":
        pytest.skip("the cuda attention kernels are fp16/bf16 only and there is no cuda block-sparse kernel; "
                    "test_gpu_bf16_model_error_ratio checks the model on the GPU backends")
    _require(backend, sparse=pattern != ("dense",))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference = make_model(torch.float32, attention_backend="reference", loss_backend="reference",
                           attention_pattern=pattern, block_size=4).to(device)
    fast = make_model(torch.float32, attention_backend=backend, loss_backend=backend,
                      attention_pattern=pattern, block_size=4).to(device)
    fast.load_state_dict(reference.state_dict())
    ids, mask, labels = (t.to(device) for t in make_batch([13, 6, 9], 13))
    exp, exp_grads = run(reference, ids, attention_mask=mask, labels=labels)
    got, got_grads = run(fast, ids, attention_mask=mask, labels=labels)
    # the same fp32 math in another order: a few fp32 ulps of the values involved
    torch.testing.assert_close(got.hidden_states, exp.hidden_states, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.loss, exp.loss, atol=2e-5, rtol=1e-5)
    assert got.n_correct.item() == exp.n_correct.item()
    for name, g in exp_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-3, msg=name)


# --------------------------------------------------------------------------- block-sparse patterns
def window_attention(x, layer, cu, window):
    """Independent oracle: per sequence, softmax over keys with |i - j| <= window, in plain torch."""
    heads, head_dim = layer.cfg.num_heads, layer.cfg.head_dim
    q, k, v = F.linear(x, layer.qkv.weight, layer.qkv.bias).view(-1, 3, heads, head_dim).unbind(1)
    out = torch.zeros_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        scores = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) / math.sqrt(head_dim)
        idx = torch.arange(b - a)
        scores = scores.masked_fill((idx[:, None] - idx[None, :]).abs() > window, float("-inf"))
        out[a:b] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v[a:b])
    return layer.attn_out(out.reshape(x.shape[0], -1))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_window_layer_equals_dense_attention_under_the_window_mask(backend):
    model = make_model(attention_pattern=("window:3",), block_size=4, attention_backend=backend)
    ids, mask, _ = make_batch([13, 6, 11], 13)
    batch, _ = model.pack(ids, mask)
    x = torch.randn(batch.num_tokens, 32)
    layer = model.layers[0]
    got = layer.attention(x, batch, model.layout(layer.pattern, batch.max_seqlen, x.device))
    torch.testing.assert_close(got, window_attention(x, layer, batch.cu_seqlens, 3))
    # and the window really restricts: dense attention differs
    assert not torch.allclose(got, layer.attention(x, batch, None))


def test_window_wider_than_the_sequence_equals_dense():
    dense = make_model()
    wide = make_model(attention_pattern=("window:20",), block_size=4)
    wide.load_state_dict(dense.state_dict())
    ids, mask, labels = make_batch([13, 6], 13)
    torch.testing.assert_close(wide(ids, attention_mask=mask, labels=labels).loss,
                               dense(ids, attention_mask=mask, labels=labels).loss)


def test_pattern_model_trains_and_builds_each_layout_once():
    model = make_model(torch.float32, attention_pattern=("dense", "window:2+global:1"), block_size=4,
                       attention_backend="torch", num_layers=4)
    ids, mask, labels = make_batch([12, 5, 9], 12)
    out, g = run(model, ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss) and all(torch.isfinite(t).all() for t in g.values())
    assert g["layers.1.qkv.weight"].abs().sum() > 0
    assert len(model._layouts) == 1  # one sparse pattern at one max_seqlen, shared by layers 1 and 3
    layout = next(iter(model._layouts.values()))
    run(model, ids, attention_mask=mask, labels=labels)
    assert len(model._layouts) == 1 and next(iter(model._layouts.values())) is layout
    run(model, ids[:, :7], attention_mask=mask[:, :7], labels=labels[:, :7])  # a new max_seqlen: one more
    assert len(model._layouts) == 2



# --------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(tmp_path):
    model = make_model(torch.float32, attention_pattern=("dense", "window:4"))
    model.save_pretrained(tmp_path)
    loaded = FastMLMForMaskedLM.from_pretrained(tmp_path, attention_backend="reference")
    assert loaded.config.attention_backend == "reference" and loaded.config.attention_pattern == ("dense", "window:4")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids, mask, labels = make_batch([9, 4], 9)
    torch.testing.assert_close(loaded.eval()(ids, attention_mask=mask, labels=labels).loss,
                               model(ids, attention_mask=mask, labels=labels).loss)


def test_load_overrides_may_not_change_what_the_weights_compute(tmp_path):
    """from_pretrained's overrides pick kernels and dropout; one that would run the weights as another function
    (other heads, activation, norm placement) was loaded without a word, and is now refused by name."""
    from fastmlm.checkpoint import CheckpointError

    model = make_model(torch.float32)
    model.save_pretrained(tmp_path)
    heads = model.config.num_heads
    for overrides in (dict(activation="relu"), dict(num_heads=1), dict(norm_position="pre")):
        with pytest.raises(CheckpointError, match=rf"config overrides {overrides} would change what the checkpoint"):
            FastMLMForMaskedLM.from_pretrained(tmp_path, **overrides)
    loaded = FastMLMForMaskedLM.from_pretrained(tmp_path, num_heads=heads, hidden_dropout=0.0)  # same value: fine
    assert loaded.config.num_heads == heads and loaded.config.hidden_dropout == 0.0


def test_save_pretrained_writes_a_manifest_and_keeps_the_pooler(tmp_path):
    from fastmlm import checkpoint as ckpt

    model = FastMLMForMaskedLM(preset("tiny", **SMALL), pooler=True)
    model.save_pretrained(tmp_path)
    assert sorted(ckpt.verify_checkpoint(tmp_path)["sha256"]) == ["config.json", "model.safetensors"]
    loaded = FastMLMForMaskedLM.from_pretrained(tmp_path)
    assert loaded.pooler is not None and torch.equal(loaded.pooler.dense.weight, model.pooler.dense.weight)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"hidden_dropout": 0.0', '"hidden_dropout": 0.5'))
    with pytest.raises(ckpt.CheckpointError, match="corrupt: config.json does not match"):
        ckpt.verify_checkpoint(tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        FastMLMForMaskedLM.from_pretrained(tmp_path)
    model = make_model(torch.float32)
    model.save_pretrained(tmp_path / "ok")
    weights = (tmp_path / "ok" / "model.safetensors").read_bytes()

    corrupt = model.save_pretrained(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        FastMLMForMaskedLM.from_pretrained(corrupt)

    other = make_model(torch.float32, num_layers=3, intermediate_size=40).save_pretrained(tmp_path / "other")
    (other / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"(?s)unexpected keys: \['layers\.2\..*shape mismatches: \['layers\.0\.mlp_in"):
        FastMLMForMaskedLM.from_pretrained(other)

    (tmp_path / "ok" / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    with pytest.raises(ValueError, match="fastmlm.hf.load_hf"):
        FastMLMForMaskedLM.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text('{"model_type": "fastmlm", "hidden_size": 32')
    with pytest.raises(ValueError, match="not valid JSON"):
        FastMLMForMaskedLM.from_pretrained(tmp_path / "ok")


# --------------------------------------------------------------------------- GPU tier
def _gpu_batch(lengths, seqlen, vocab):
    ids, mask, labels = make_batch(lengths, seqlen, vocab=vocab, mask_prob=0.15)
    return ids.cuda(), mask.cuda(), labels.cuda()


@pytest.mark.gpu
def test_gpu_bf16_model_error_ratio():
    """bf16 model on the fast backends vs the same bf16 model on the references, both against fp64."""
    from helpers import assert_error_ratio
    sizes = dict(vocab_size=1003, hidden_size=256, num_heads=4, num_layers=2, intermediate_size=1024,
                 max_position_embeddings=512)
    exact = make_model(torch.float64, attention_backend="reference", loss_backend="reference", **sizes).cuda()
    lowp = make_model(torch.bfloat16, attention_backend="reference", loss_backend="reference", **sizes).cuda()
    fast = make_model(torch.bfloat16, **sizes).cuda()
    lowp.load_state_dict(exact.state_dict())
    fast.load_state_dict(exact.state_dict())
    ids, mask, labels = _gpu_batch([257, 1, 130, 200], 257, 1003)
    runs = {name: run(m, ids, attention_mask=mask, labels=labels) for name, m in
            (("exact", exact), ("lowp", lowp), ("fast", fast))}
    (e, eg), (l, lg), (f, fg) = runs["exact"], runs["lowp"], runs["fast"]
    assert_error_ratio(f.hidden_states[mask], e.hidden_states[mask], l.hidden_states[mask], 2.0, what="hidden")
    # (R, V) logits rather than the scalar loss: one number can be luckily exact in low precision
    positions = (labels.reshape(-1) != -100).nonzero()[:, 0]
    logits = {name: m.masked_logits(ids, attention_mask=mask, positions=positions).detach()
              for name, m in (("exact", exact), ("lowp", lowp), ("fast", fast))}
    assert_error_ratio(logits["fast"], logits["exact"], logits["lowp"], 2.0, what="masked logits")
    assert abs(f.loss.item() - e.loss.item()) < 0.05 * e.loss.item()
    for name in ("layers.0.qkv.weight", "embeddings.word.weight", "head.dense.weight"):
        assert_error_ratio(fg[name], eg[name], lg[name], 3.0, what=f"grad {name}")


@pytest.mark.gpu
def test_gpu_packed_step_has_no_host_sync():
    """Packed input + masked_positions (what the collator gives): no host synchronisation at all."""
    model = make_model(torch.bfloat16, vocab_size=1003, hidden_size=128, num_heads=2,
                       max_position_embeddings=128).cuda().train()
    lengths = [100, 37, 64, 1]
    ids, mask, labels = _gpu_batch(lengths, 100, 1003)
    packed_ids, packed_labels = ids[mask], labels[mask]
    positions = torch.nn.functional.pad((packed_labels != -100).nonzero()[:, 0], (0, 7), value=-1)
    cu = cu_seqlens_of(lengths).cuda()
    run(model, packed_ids, labels=packed_labels, masked_positions=positions, cu_seqlens=cu, max_seqlen=100)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(packed_ids, labels=packed_labels, masked_positions=positions, cu_seqlens=cu, max_seqlen=100)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.loss).item()
