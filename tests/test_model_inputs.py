"""fastmlm.model at the edges: empty and all-padding batches, sequence length 0, NaN in weights and
under padding, and the clear errors bad inputs get."""
import pytest
import torch

from fastmlm.model import FastMLMForMaskedLM
from helpers import cu_seqlens_of
from model_fixtures import grads, make_batch, make_model, run


# --------------------------------------------------------------------------- edge cases
def test_no_masked_tokens_gives_zero_loss_and_zero_grads():
    model = make_model()
    ids, mask, labels = make_batch([7, 4], 7)
    for kwargs in (dict(), dict(masked_positions=torch.full((4,), -1))):
        out, g = run(model, ids, attention_mask=mask, labels=torch.full_like(labels, -100), **kwargs)
        assert out.loss.item() == 0.0 and out.n_masked.item() == 0 and out.n_correct.item() == 0
        assert all(torch.isfinite(t).all() and (t == 0).all() for t in g.values())


@pytest.mark.parametrize("shape", [(3, 6), (0, 6)])
def test_all_padding_batch(shape):
    model = make_model()
    ids = torch.zeros(shape, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.bool)
    out, g = run(model, ids, attention_mask=mask, labels=torch.full(shape, -100))
    assert out.loss.item() == 0.0 and out.hidden_states.shape == shape + (32,) and (out.hidden_states == 0).all()
    assert all(torch.isfinite(t).all() for t in g.values())


def test_a_sequence_of_length_one_and_an_empty_one_in_a_batch():
    model = make_model()
    ids, mask, labels = make_batch([5, 1, 0], 5)
    out, g = run(model, ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss) and out.loss > 0 and (out.hidden_states[2] == 0).all()
    torch.testing.assert_close(out.hidden_states[1, :1], model(ids[1:2, :1]).hidden_states[0])
    assert all(torch.isfinite(t).all() for t in g.values())


@pytest.mark.parametrize("with_mask", [False, True])
def test_sequence_length_zero_gives_the_empty_result(with_mask):
    """(B, 0) input_ids hold no token: empty hidden states, loss 0, zero grads, zero logits rows."""
    model = make_model()
    ids = torch.zeros(3, 0, dtype=torch.long)
    mask = torch.zeros(3, 0, dtype=torch.bool) if with_mask else None
    out, g = run(model, ids, attention_mask=mask, labels=torch.full((3, 0), -100))
    assert out.hidden_states.shape == (3, 0, 32) and out.loss.item() == 0.0 and out.n_masked.item() == 0
    assert all((t == 0).all() for t in g.values())
    logits = model.masked_logits(ids, attention_mask=mask, positions=torch.full((2,), -1))
    assert logits.shape == (2, 123) and (logits == 0).all()


# NaN in must mean NaN out, and padding must never contribute. Short sequences (< 16 tokens)
# on purpose: there ATen's CPU attention kernel turned a NaN query into a finite output.
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("padded", [False, True])
def test_nan_in_a_weight_or_a_used_embedding_gives_a_nan_loss(backend, padded):
    ids, mask, labels = make_batch([8, 5] if padded else [8, 8], 8)
    kwargs = dict(attention_mask=mask if padded else None, labels=labels)
    poisons = {"query weight": lambda m: m.layers[0].qkv.weight[0],  # row 0 = head 0 of the query
               "word embedding": lambda m: m.embeddings.word.weight[ids[0, 3]]}
    for what, row in poisons.items():
        model = make_model(attention_backend=backend, loss_backend=backend)
        with torch.no_grad():
            row(model)[0] = float("nan")
        out = model(ids, **kwargs)
        assert torch.isnan(out.loss), f"{what}: finite loss {out.loss.item()} from a NaN weight"
        # attention spreads the NaN to every token of row 0 (and the query weight's to every row)
        assert torch.isnan(out.hidden_states[0][mask[0]]).all(), what


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nan_under_padding_does_not_reach_real_rows(backend):
    model = make_model(attention_backend=backend, loss_backend=backend)
    ids, mask, labels = make_batch([9, 5], 11)  # positions 9 and 10 hold padding only
    ids[~mask] = 77
    clean = model(ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        model.embeddings.position.weight[9:] = float("nan")
    poisoned = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(poisoned.loss, clean.loss)
    torch.testing.assert_close(poisoned.hidden_states, clean.hidden_states)
    with torch.no_grad():  # the word under the padding; the loss would see it through the tied decoder
        model.embeddings.word.weight[77] = float("nan")
    torch.testing.assert_close(model(ids, attention_mask=mask).hidden_states, clean.hidden_states)



def test_masked_positions_that_miss_a_labelled_token_are_refused():
    model = make_model()
    ids, mask, labels = make_batch([6, 3], 6)
    found = (labels.reshape(-1) != -100).nonzero()[:, 0]
    assert found.numel() >= 2
    message = "masked_positions must list every token whose label is not -100, each once"
    # was: the left-out tokens silently did not count (a loss over the others, or 0 with none listed)
    for positions in (found[1:], torch.full((4,), -1), torch.cat([found, found[:1]])):
        with pytest.raises(RuntimeError, match=message):
            model(ids, attention_mask=mask, labels=labels, masked_positions=positions)
    model(ids, attention_mask=mask, labels=labels, masked_positions=torch.cat([found, torch.full((3,), -1)]))


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_get_clear_errors():
    model = make_model()
    ids, mask, labels = make_batch([6, 3], 6)
    cases = [
        (dict(input_ids=ids.float()), ValueError, "input_ids must be an int32/int64 tensor"),
        (dict(input_ids=ids[None]), ValueError, r"must be \(B, S\) padded or \(T,\) packed"),
        (dict(input_ids=ids, attention_mask=mask.float()), ValueError, "not a float additive bias"),
        (dict(input_ids=ids, attention_mask=mask[:, :5]), ValueError, r"attention_mask is \(2, 5\) on cpu, expected"),
        (dict(input_ids=ids, attention_mask=mask.to("meta")), ValueError, r"attention_mask is \(2, 6\) on meta"),
        (dict(input_ids=ids, labels=labels.to("meta")), ValueError, "labels is on meta but input_ids is on cpu"),
        (dict(input_ids=ids, labels=labels, masked_positions=torch.tensor([0.0])), ValueError,
         "masked_positions has dtype torch.float32"),
        (dict(input_ids=ids, labels=labels[:, :5]), ValueError, r"labels has shape \(2, 5\)"),
        (dict(input_ids=ids, token_type_ids=ids[:1]), ValueError, "token_type_ids has shape"),
        (dict(input_ids=ids[mask]), ValueError, "packed .* need cu_seqlens"),
        (dict(input_ids=ids, cu_seqlens=cu_seqlens_of([6, 3]), max_seqlen=6), ValueError, "are for packed"),
        (dict(input_ids=ids, labels=labels, loss_reduction="none"), ValueError, "loss_reduction must be"),
        (dict(input_ids=ids, masked_positions=torch.tensor([0])), ValueError, "masked_positions needs labels"),
        (dict(input_ids=torch.zeros(1, 65, dtype=torch.long)), ValueError, "exceeds max_position_embeddings=64"),
        (dict(input_ids=ids + 200), RuntimeError, r"input_ids must lie in \[0, 123\)"),
        # a packed sequence longer than max_seqlen (here also than the 64 positions): caught before the embedding
        (dict(input_ids=torch.ones(70, dtype=torch.long), cu_seqlens=cu_seqlens_of([3, 67]), max_seqlen=10),
         RuntimeError, r"no packed sequence may be longer than max_seqlen=10 \(at most max_position_embeddings=64"),
        (dict(input_ids=torch.ones(12, dtype=torch.long), cu_seqlens=cu_seqlens_of([12]), max_seqlen=4),
         RuntimeError, "no packed sequence may be longer than max_seqlen=4"),
        (dict(input_ids=ids, token_type_ids=ids), RuntimeError, r"token_type_ids must lie in \[0, 2\)"),
        (dict(input_ids=ids, labels=torch.full_like(ids, 500)), RuntimeError, "labels must be -100 or a token id"),
        (dict(input_ids=ids, attention_mask=mask, labels=torch.where(mask, -100, 5)), RuntimeError,
         "labels must be -100 at padding"),
        (dict(input_ids=ids, labels=labels, masked_positions=torch.tensor([12])), RuntimeError,
         r"masked_positions must lie in \[-1, 12\)"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            model(**kwargs)
    with pytest.raises(ValueError, match="masked_logits needs positions"):
        model.masked_logits(ids)
    with pytest.raises(ValueError, match="expected a ModelConfig"):
        FastMLMForMaskedLM({"hidden_size": 8})
