"""Benchmark of one MLM training step: forward + backward + AdamW, fastmlm against Hugging Face BERT.

The batch is realistic: sequence lengths uniform in [min_len, S], 15% of the real
tokens masked (their positions handed to fastmlm as ``masked_positions``, as the
data collator does; Hugging Face gets the same ``labels``). Every provider runs
the same architecture (``fastmlm.config.preset``, mapped onto ``BertConfig``) with
the same dropout, in fp32 on the CPU and with bf16 weights on a GPU.

Providers:
  fastmlm        FastMLMForMaskedLM, attention and loss backends "auto"
  hf-bert-sdpa   transformers.BertForMaskedLM, attn_implementation="sdpa"
  hf-bert-eager  transformers.BertForMaskedLM, attn_implementation="eager"

tokens/s counts real (non-padding) tokens. The check of fastmlm runs one
dropout-free forward of the same weights with every backend set to "reference"
and compares the loss; the Hugging Face models are only checked for a finite
loss near ln(V) (they start from their own random weights).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from fastmlm.testing import CheckFailed

from .common import generator, preset_dtypes, preset_shapes, require_module
from .harness import Skip, Workload

OP = "train_step"
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
MASK_TOKEN_ID = 4


def _shape(preset, batch, seqlen, min_len, rate=0.15):
    return {"preset": preset, "batch": batch, "seqlen": seqlen, "min_len": min_len, "rate": rate,
            "pass": "fwd+bwd+adamw"}


SHAPES = {  # preset -> its shapes
    "smoke": [_shape("tiny", 2, 16, 4)],
    "cpu": [_shape("mini", 32, 128, 32)],  # issue 5's CPU figure
    "gpu-check": [_shape("base", 64, 128, 32), _shape("base", 16, 512, 128)],
    "gpu": [_shape("base", 128, 128, 32), _shape("base", 32, 512, 128)],
}
shapes, dtypes = preset_shapes(SHAPES), preset_dtypes


def label(shape: dict) -> str:
    return (f"{shape['preset']} b={shape['batch']} s={shape['seqlen']} len>={shape['min_len']} "
            f"masked={shape['rate']:.0%}")


def providers(shape: dict, device: str) -> list[str]:
    return ["fastmlm", "hf-bert-sdpa", "hf-bert-eager"]


# --------------------------------------------------------------------------- batch and models
def make_batch(cfg, shape: dict, device: str) -> dict:
    """A padded MLM batch: input ids, attention mask, labels (-100 off the masked tokens), masked positions."""
    b, s = shape["batch"], shape["seqlen"]
    gen = generator(0)
    lengths = torch.randint(shape["min_len"], s + 1, (b,), generator=gen)
    real = torch.arange(s)[None, :] < lengths[:, None]
    ids = torch.randint(5, cfg.vocab_size, (b, s), generator=gen)
    masked = (torch.rand(b, s, generator=gen) < shape["rate"]) & real
    masked[0, 0] = True
    labels = torch.where(masked, ids, -100)
    ids = torch.where(masked, MASK_TOKEN_ID, torch.where(real, ids, cfg.pad_token_id))
    return {"input_ids": ids.to(device), "attention_mask": real.to(device), "labels": labels.to(device),
            "masked_positions": masked.flatten().nonzero()[:, 0].to(device), "real_tokens": int(lengths.sum())}


def model_config(shape: dict):
    config = require_module("fastmlm.config", "fastmlm.config")
    return config.preset(shape["preset"], max_position_embeddings=max(512, shape["seqlen"]))


def _fastmlm_model(cfg):
    model_module = require_module("fastmlm.model", "fastmlm.model (the encoder)")
    return model_module.FastMLMForMaskedLM(cfg)


def _hf_model(cfg, attn_implementation: str):
    transformers = require_module("transformers", "transformers")
    if cfg.norm_position != "post":
        raise Skip("BertForMaskedLM has post-LayerNorm only")
    bert_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        pad_token_id=cfg.pad_token_id, hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=HF_ACTIVATIONS[cfg.activation], initializer_range=cfg.initializer_range)
    return transformers.AutoModelForMaskedLM.from_config(bert_cfg, attn_implementation=attn_implementation)


# --------------------------------------------------------------------------- workload
def make(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    cfg = model_config(shape)
    batch = make_batch(cfg, shape, device)
    torch.manual_seed(0)
    if provider == "fastmlm":
        model = _fastmlm_model(cfg)
        call = lambda m: m(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                           masked_positions=batch["masked_positions"]).loss
    elif provider in ("hf-bert-sdpa", "hf-bert-eager"):
        model = _hf_model(cfg, provider.split("-")[-1])
        call = lambda m: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                           labels=batch["labels"]).loss
    else:
        raise ValueError(f"unknown train_step provider {provider!r}")
    model = model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        call(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def check() -> str:
        loss = call(model)
        loss.backward()
        loss = loss.detach()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss) or bad:
            raise CheckFailed(f"loss {float(loss):.4g}, non-finite gradients in {bad[:3]}")
        if provider == "fastmlm":
            return _check_against_reference(model, cfg, call, dtype)
        ln_v = math.log(cfg.vocab_size)
        if not 0.5 * ln_v < float(loss) < 2.0 * ln_v:
            raise CheckFailed(f"initial loss {float(loss):.3f} is far from ln(V) = {ln_v:.3f}")
        return f"sanity only: finite loss {float(loss):.3f} ~ ln(V) {ln_v:.3f}, finite gradients"

    return Workload(step=step, check=check, tokens=batch["real_tokens"])


def _check_against_reference(model, cfg, call, dtype) -> str:
    """Same weights, dropout off: the auto backends against every op's reference backend."""
    reference = _fastmlm_model(dataclasses.replace(cfg, attention_backend="reference", loss_backend="reference"))
    reference.load_state_dict(model.state_dict())
    reference = reference.to(next(model.parameters()).device, dtype).eval()
    model.eval()
    with torch.no_grad():
        fast, ref = float(call(model)), float(call(reference))
    model.train()
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    if not abs(fast - ref) <= tol * max(1.0, abs(ref)):
        raise CheckFailed(f"eval loss {fast:.6f} vs reference backends {ref:.6f} (tolerance {tol:g} relative)")
    return f"eval loss {fast:.5f} vs reference backends {ref:.5f}"
