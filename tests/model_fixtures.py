"""The small model and batches shared by the model tests."""
import torch

from fastmlm.config import preset
from fastmlm.model import FastMLMForMaskedLM

# Small enough for the Triton interpreter: 2 layers, hidden 32, 2 heads, vocab 123 (not a multiple of 8).
SMALL = dict(vocab_size=123, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
             max_position_embeddings=64, hidden_dropout=0.0)


def make_model(dtype=torch.float32, **overrides):
    model = FastMLMForMaskedLM(preset("tiny", **{**SMALL, **overrides})).to(dtype).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and biases
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_batch(lengths, seqlen, vocab=123, mask_prob=0.3):
    """Right-padded ids, mask and labels; every real row gets at least one masked token."""
    lengths = torch.tensor(lengths)
    mask = torch.arange(seqlen)[None, :] < lengths[:, None]
    ids = torch.randint(1, vocab, (len(lengths), seqlen)) * mask
    masked = (torch.rand(ids.shape) < mask_prob) & mask
    masked[lengths > 0, 0] = True
    return ids, mask, torch.where(masked, ids, -100)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    out.loss.backward()
    return out, grads(model)
