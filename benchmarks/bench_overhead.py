"""Per-call overhead of fastmlm's Python layer (issue 22): the public op against the backend it picks.

Tiny shapes, where the kernels take microseconds and whatever the boundary adds (validation,
backend choice, custom-op wrapping, layout bookkeeping) shows. Cases (the ``case`` field):

  attention-padded   (B, S, H, D), no mask
  attention-masked   (B, S, H, D) + a (B, S) padding mask (one sequence shorter)
  attention-packed   (T, H, D) + cu_seqlens, the same lengths packed
  masked_lm_loss     hidden (T, C), tied weight (V, C) and bias, ~15% of the tokens as rows

each for ``pass`` fwd and fwd+bwd. Providers:

  fastmlm    the public op (``backend="auto"``) on a repeated signature
  backend    the chosen backend's own ``forward`` (and ``backward``) on the same bundle, called
             directly: what is left once the boundary is gone
  kernel     CPU attention only: the ATen flash-attention call(s) the torch backend makes, on
             tensors already in its layout (the floor under any Python layer)
  torch      masked_lm_loss only: gather the rows, ``F.linear``, ``F.cross_entropy`` (the issue's peer)

One timed step is ``calls`` calls; :func:`report` turns step medians into µs per call and prints
the added time (fastmlm - backend, fastmlm - kernel/torch). CPU figures need ``--threads 1`` and
a quiet host: the summary records the load average.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fastmlm.ops  # noqa: F401  (the op modules below are shadowed by the functions of the same name)
from fastmlm.ops import attention, masked_lm_loss

from .common import generator, preset_dtypes, randn, zero_grads
from .harness import Skip, Workload

OP = "overhead"
MEASURE_MEMORY = False  # nothing to measure: the inputs are a few KiB
CASES = ("attention-padded", "attention-masked", "attention-packed", "masked_lm_loss")
PASSES = ("fwd", "fwd+bwd")
TINY = {"batch": 2, "seqlen": 32, "heads": 2, "head_dim": 64, "tokens": 64, "hidden": 64, "vocab": 128}


def shapes(preset: str) -> list[dict]:
    if preset not in ("smoke", "cpu", "gpu-check", "gpu"):
        raise ValueError(f"unknown preset {preset!r}")
    calls = 20 if preset == "smoke" else 200
    return [{"case": case, "pass": p, "calls": calls, **TINY} for case in CASES for p in PASSES]


dtypes = preset_dtypes


def label(shape: dict) -> str:
    if shape["case"] == "masked_lm_loss":
        return f"{shape['case']} t={shape['tokens']} c={shape['hidden']} v={shape['vocab']} {shape['pass']}"
    return (f"{shape['case']} b={shape['batch']} s={shape['seqlen']} h={shape['heads']} d={shape['head_dim']} "
            f"{shape['pass']}")


def providers(shape: dict, device: str) -> list[str]:
    peer = "torch" if shape["case"] == "masked_lm_loss" else "kernel"
    return ["fastmlm", "backend", peer]


def _op_module(name: str):
    return sys.modules[f"fastmlm.ops.{name}"]


def _repeat(call, calls: int):
    def step():
        for _ in range(calls):
            call()
    return step


def _chosen_backend(registry, inputs, device_type: str):
    """The backend module ``auto`` picks for ``inputs`` (Skip when it is the reference: nothing to compare)."""
    name = registry.chosen("auto", device_type, inputs)
    if name == "reference":
        raise Skip("auto picks the reference here: there is no backend call to compare with")
    return registry.module(name)


def _grads_of(loss_or_out, leaves, upstream=None):
    return torch.autograd.grad(loss_or_out, leaves, upstream)


# --------------------------------------------------------------------------- attention
def _attention(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    A = _op_module("attention")
    b, s, h, d = shape["batch"], shape["seqlen"], shape["heads"], shape["head_dim"]
    layout = shape["case"].split("-")[1]
    gen = generator(22)
    lengths = [s] + [s - s // 3] * (b - 1)
    grad = shape["pass"] == "fwd+bwd"
    if layout == "packed":
        q, k, v = (randn((sum(lengths), h, d), dtype, device, gen).requires_grad_(grad) for _ in range(3))
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        kwargs, mask = {"cu_seqlens": cu, "max_seqlen": s}, None
    else:
        q, k, v = (randn((b, s, h, d), dtype, device, gen).requires_grad_(grad) for _ in range(3))
        mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).to(device) if layout == "masked" else None
        kwargs, cu = {"attention_mask": mask}, None
    upstream = torch.ones_like(q)
    inputs = A.validated_inputs("attention", q, k, v, mask, cu, kwargs.get("max_seqlen"), None, "auto")

    if provider == "fastmlm":
        def call():
            out = attention(q, k, v, **kwargs)
            if grad:
                _grads_of(out, (q, k, v), upstream)
    elif provider == "backend":
        mod = _chosen_backend(A.REGISTRY, inputs, q.device.type)

        def call():
            with torch.no_grad():
                out, lse = mod.forward(inputs)
                if grad:
                    mod.backward(inputs, out, lse, upstream)
    else:  # the ATen kernel(s) of the CPU torch backend, on its layout
        if device != "cpu":
            raise Skip("the kernel floor is measured on the CPU (on a GPU the backend's call is the kernel launch)")
        if layout == "packed":
            raise Skip("ATen has no packed CPU kernel: the torch backend pads, so its kernel call is the masked case's")
        from fastmlm.ops.torch_impl import attention as torch_attention
        qp, kp, vp = (t.detach().transpose(1, 2) for t in (q, k, v))
        bias = None if mask is None else \
            torch.zeros(b, 1, 1, s, dtype=dtype).masked_fill_(~mask[:, None, None, :], torch.finfo(dtype).min)
        scale = inputs.scale

        def call():
            out, lse = torch_attention._ATEN_FWD(qp, kp, vp, 0.0, False, attn_mask=bias, scale=scale)
            if grad:
                torch_attention._ATEN_BWD(upstream.transpose(1, 2), qp, kp, vp, out, lse, 0.0, False,
                                          attn_mask=bias, scale=scale)
    return _workload(call, shape["calls"], (q, k, v))


# --------------------------------------------------------------------------- masked_lm_loss
def _masked_lm_loss(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    M = _op_module("masked_ce")
    t, c, vocab = shape["tokens"], shape["hidden"], shape["vocab"]
    gen = generator(22)
    grad = shape["pass"] == "fwd+bwd"
    hidden = randn((t, c), dtype, device, gen).requires_grad_(grad)
    weight = randn((vocab, c), dtype, device, gen, scale=0.05).requires_grad_(grad)
    bias = randn((vocab,), dtype, device, gen, scale=0.05).requires_grad_(grad)
    picked = torch.arange(0, t, 7)  # ~15% of the tokens
    labels = torch.full((t,), -100, dtype=torch.int64)
    labels[picked] = torch.randint(0, vocab, (picked.numel(),), generator=gen)
    labels = labels.to(device)
    leaves = (hidden, weight, bias)

    if provider == "fastmlm":
        def call():
            loss = masked_lm_loss(hidden, weight, bias, labels)
            if grad:
                _grads_of(loss, leaves)
    elif provider == "backend":
        inputs = M.MaskedCEInputs(hidden, weight, bias, labels, None, -100, 0.0, 0.0)
        mod = _chosen_backend(M.REGISTRY, inputs, hidden.device.type)
        counted = labels != -100
        grad_rows = counted.float() / counted.sum()  # the mean's weight of each row

        def call():
            with torch.no_grad():  # with gradients: the backend computes them in its forward (issue 16)
                mod.forward_and_grads(inputs, grad_rows) if grad else mod.forward(inputs)
    else:  # what a user writes instead: gather the labelled rows, project, cross-entropy
        rows = (labels != -100).nonzero().squeeze(1)  # built once: the peer is given its rows

        def call():
            loss = F.cross_entropy(F.linear(hidden[rows], weight, bias).float(), labels[rows])
            if grad:
                _grads_of(loss, leaves)
    return _workload(call, shape["calls"], leaves)


def _workload(call, calls: int, leaves) -> Workload:
    def check() -> str:
        call()  # runs (and raises if the provider cannot); correctness is the ops' tests' and the op benches' job
        zero_grads(*leaves)
        return f"{calls} calls per step"
    return Workload(step=_repeat(call, calls), check=check)


def make(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    if shape["case"] == "masked_lm_loss":
        return _masked_lm_loss(provider, shape, dtype, device)
    return _attention(provider, shape, dtype, device)


# --------------------------------------------------------------------------- report
def report(rows: list[dict]) -> str:
    """Markdown: per case and pass, µs per call of each provider and the time fastmlm adds."""
    per_call: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["op"] != OP or r["metric"] != "time" or r["median"] is None:
            continue
        key = (r["params"]["case"], r["params"]["pass"], r["dtype"])
        per_call.setdefault(key, {})[r["provider"]] = r["median"] * 1e3 / r["params"]["calls"]
    lines = ["| case | pass | dtype | fastmlm µs | backend µs | added over backend µs | kernel / torch µs | "
             "added over kernel / torch µs |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "—" if x is None else f"{x:.1f}"
    for (case, p, dt), cell in per_call.items():
        ours, backend = cell.get("fastmlm"), cell.get("backend")
        floor = cell.get("kernel", cell.get("torch"))
        added = None if ours is None or backend is None else ours - backend
        over_floor = None if ours is None or floor is None else ours - floor
        lines.append(f"| {case} | {p} | {dt} | {fmt(ours)} | {fmt(backend)} | {fmt(added)} | {fmt(floor)} | "
                     f"{fmt(over_floor)} |")
    return "\n".join(lines)
