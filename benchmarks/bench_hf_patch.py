"""Benchmark of fastmlm inside a transformers model: one BertForMaskedLM training step, patched against unpatched.

The same transformers.BertForMaskedLM (architecture from ``fastmlm.config.preset``, as in
bench_train_step.py, and the same padded batch: lengths uniform in [min_len, S], 15% of the
real tokens masked, labels -100 elsewhere) trained for one step (forward + backward + AdamW):

  fastmlm-hf-patch   fastmlm.hf.patch(model): fastmlm attention, the masked-rows-only loss and, on the CPU,
                     the encoder on the real tokens only (unpad="auto", fastmlm/hf/unpad.py)
  fastmlm-hf-patch-unpad  (CUDA only) patch(model, unpad=True): unpadded there too, one host sync per step
  fastmlm-hf-attn    attn_implementation="fastmlm" only (transformers' own full-logits loss)
  hf-bert-sdpa       unpatched, attn_implementation="sdpa"
  hf-bert-eager      unpatched, attn_implementation="eager"

The CPU preset adds base without the optimizer step (fwd+bwd only, the patch against sdpa): on
the CPU the full step's peak memory is AdamW's (its state, created by the first step, and its
update temporaries), the same for every provider, and hides the activations the patch saves.

Every provider starts from the same random weights (seeded). tokens/s counts real
(non-padding) tokens. The fastmlm providers are checked by the error-ratio rule on the first
two sequences of the batch, dropout off: loss and three gradients (word embeddings, the first
query projection, the head transform) against the unpatched model in fp64 (fp32 on a GPU) and in
the benchmark dtype; the unpatched ones only for a finite loss near ln(V).
"""
from __future__ import annotations

import copy
import math

import torch

from fastmlm.testing import CheckFailed, check_error_ratios, oracle_dtype

from .bench_train_step import _hf_model, make_batch, model_config
from .common import preset_dtypes, preset_shapes, require_module
from .harness import Workload

OP = "hf_patch"
CHECKED_GRADS = ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
                 "cls.predictions.transform.dense.weight")


FULL_STEP, NO_OPTIMIZER = "fwd+bwd+adamw", "fwd+bwd"


def _shape(preset, batch, seqlen, min_len, rate=0.15, pass_=FULL_STEP):
    return {"preset": preset, "batch": batch, "seqlen": seqlen, "min_len": min_len, "rate": rate, "pass": pass_}


SHAPES = {  # preset -> its shapes
    "smoke": [_shape("tiny", 2, 16, 4)],
    # base fwd+bwd: on the CPU AdamW's first-step state and update temporaries set the full step's peak for
    # every provider alike, so the activation memory the patch saves shows only without the optimizer.
    "cpu": [_shape("mini", 32, 128, 32), _shape("base", 8, 128, 32), _shape("base", 8, 128, 32, pass_=NO_OPTIMIZER)],
    "gpu-check": [_shape("base", 64, 128, 32), _shape("base", 16, 512, 128)],
    "gpu": [_shape("base", 128, 128, 32), _shape("base", 32, 512, 128)],
}
shapes, dtypes = preset_shapes(SHAPES), preset_dtypes


def label(shape: dict) -> str:
    extra = "" if shape.get("pass", FULL_STEP) == FULL_STEP else f" {shape['pass']} only"
    return (f"BertForMaskedLM {shape['preset']} b={shape['batch']} s={shape['seqlen']} len>={shape['min_len']} "
            f"masked={shape['rate']:.0%}{extra}")


def providers(shape: dict, device: str) -> list[str]:
    if shape.get("pass", FULL_STEP) == NO_OPTIMIZER:  # a memory comparison: the patch against its baseline
        return ["fastmlm-hf-patch", "hf-bert-sdpa"]
    # On the CPU fastmlm-hf-patch unpads already (unpad="auto"); on CUDA that costs a host sync, so it is opt-in.
    unpadded = ["fastmlm-hf-patch-unpad"] if device.startswith("cuda") else []
    return ["fastmlm-hf-patch", *unpadded, "hf-bert-sdpa", "fastmlm-hf-attn", "hf-bert-eager"]


def _model(provider: str, cfg):
    """The seeded BertForMaskedLM of one provider (fp32, on the CPU)."""
    torch.manual_seed(0)
    if provider in ("hf-bert-sdpa", "hf-bert-eager"):
        return _hf_model(cfg, provider.split("-")[-1])
    hf = require_module("fastmlm.hf", "fastmlm.hf")
    model = _hf_model(cfg, "sdpa")
    if provider == "fastmlm-hf-patch":
        return hf.patch(model)
    if provider == "fastmlm-hf-patch-unpad":
        return hf.patch(model, unpad=True)
    if provider == "fastmlm-hf-attn":
        hf.register()
        model.set_attn_implementation("fastmlm")
        return model
    raise ValueError(f"unknown hf_patch provider {provider!r}")


def _loss(model, batch: dict, rows: slice = slice(None)):
    return model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows].long(),
                 labels=batch["labels"][rows]).loss


def make(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    cfg = model_config(shape)
    batch = make_batch(cfg, shape, device)
    model = _model(provider, cfg).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with_optimizer = shape.get("pass", FULL_STEP) == FULL_STEP

    def step():
        _loss(model, batch).backward()
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def check() -> str:
        loss = _loss(model, batch)
        loss.backward()
        loss = loss.detach()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss) or bad:
            raise CheckFailed(f"loss {float(loss):.4g}, non-finite gradients in {bad[:3]}")
        if provider.startswith("fastmlm"):
            return _check_against_unpatched(model, cfg, batch, dtype, device)
        ln_v = math.log(cfg.vocab_size)
        if not 0.5 * ln_v < float(loss) < 2.0 * ln_v:
            raise CheckFailed(f"initial loss {float(loss):.3f} is far from ln(V) = {ln_v:.3f}")
        return f"sanity only: finite loss {float(loss):.3f} ~ ln(V) {ln_v:.3f}, finite gradients"

    return Workload(step=step, check=check, tokens=batch["real_tokens"])


def _check_against_unpatched(model, cfg, batch: dict, dtype: torch.dtype, device: str) -> str:
    """The error-ratio rule, dropout off, on two sequences: this model against the unpatched one in the
    oracle dtype (exact) and in the benchmark dtype (low precision), same weights."""
    unpatched = _hf_model(cfg, "sdpa")
    state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    unpatched.load_state_dict(state, strict=False)  # the tied decoder weight is the embedding matrix either way
    runs = {}
    for name, m in (("fast", model), ("exact", copy.deepcopy(unpatched).to(device, oracle_dtype(device))),
                    ("lowp", unpatched.to(device, dtype))):
        was_training = m.training
        m.eval()
        loss = _loss(m, batch, slice(0, 2))
        loss.backward()
        params = dict(m.named_parameters())
        runs[name] = {"loss": loss.detach(), **{g: params[g].grad.detach().clone() for g in CHECKED_GRADS}}
        m.zero_grad(set_to_none=True)
        m.train(was_training)
    return check_error_ratios(runs["fast"], runs["exact"], runs["lowp"], {"loss": 2.0}, default_ratio=3.0)
