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
             directly: what is left once the boundary is gone (no autograd either). Attention's
             fwd asks for the out alone, as ``attention(...)`` does. The loss's is its reduced
             call, with fwd+bwd the gradients computed in the forward (the fused route), although
             on these tiny CPU calls the op lets autograd record its forward-only route instead:
             there ``fastmlm - backend`` is autograd's backward plus the boundary, set against
             the fused route's own cost
  kernel     CPU attention only: the ATen flash-attention call(s) the torch backend makes, on
             tensors already in its layout (the floor under any Python layer)
  sdpa       padded attention only: ``F.scaled_dot_product_attention`` on (B, H, S, D) views, the
             issue's peer; with fwd+bwd, ``sdpa - kernel`` is what PyTorch's own autograd costs a
             native op (``torch.autograd.grad`` included), a floor no boundary can go under
  torch      packed attention: the plain-PyTorch route a user would write (pad q, k, v stacked with
             one ``index_copy``, SDPA with the key mask, unpad with one ``index_select``, the index and
             mask built once); masked_lm_loss: gather the rows, ``F.linear``, ``F.cross_entropy``
             (the issues' peers)

On the CPU the figures that count come from one interleaved session per case: every provider's
calls alternate, round after round (the order rotating), each call timed alone on the thread's
CPU clock (time on a shared host during which this process was not running does not count); a
round's figure is the median of its calls, and a provider's figure the median (p20, p80) of its
rounds. Each row's ``note`` carries them ("interleaved µs/call median … p20 … p80 …") and
:func:`report` uses them; elsewhere (GPU) it uses the harness's own timing of ``calls`` calls a
step. CPU figures need ``--threads 1``; the summary records the load average.
"""
from __future__ import annotations

import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastmlm.ops  # noqa: F401  (the op modules below are shadowed by the functions of the same name)
from fastmlm.ops import attention, masked_lm_loss
from fastmlm.ops import dispatch, padding

from .common import generator, preset_dtypes, randn, zero_grads
from .harness import Skip, Workload, percentile

OP = "overhead"
MEASURE_MEMORY = False  # nothing to measure: the inputs are a few KiB
CASES = ("attention-padded", "attention-masked", "attention-packed", "masked_lm_loss")
PASSES = ("fwd", "fwd+bwd")
TINY = {"batch": 2, "seqlen": 32, "heads": 2, "head_dim": 64, "tokens": 64, "hidden": 64, "vocab": 128}


CALLS = 20  # calls per timed step (harness) and per round (interleaved session)
ROUNDS = {"smoke": 3}  # rounds of the interleaved session; 30 for the other presets (under a minute in all)
_NOTE = re.compile(r"interleaved µs/call median ([0-9.]+) p20 ([0-9.]+) p80 ([0-9.]+)")


def shapes(preset: str) -> list[dict]:
    if preset not in ("smoke", "cpu", "gpu-check", "gpu"):
        raise ValueError(f"unknown preset {preset!r}")
    rounds = ROUNDS.get(preset, 30)
    return [{"case": case, "pass": p, "calls": CALLS, "rounds": rounds, **TINY} for case in CASES for p in PASSES]


dtypes = preset_dtypes


def label(shape: dict) -> str:
    if shape["case"] == "masked_lm_loss":
        return f"{shape['case']} t={shape['tokens']} c={shape['hidden']} v={shape['vocab']} {shape['pass']}"
    return (f"{shape['case']} b={shape['batch']} s={shape['seqlen']} h={shape['heads']} d={shape['head_dim']} "
            f"{shape['pass']}")


def providers(shape: dict, device: str) -> list[str]:
    if shape["case"] in ("masked_lm_loss", "attention-packed"):
        return ["fastmlm", "backend", "torch"]
    return ["fastmlm", "backend", "kernel", "sdpa"]


def _op_module(name: str):
    return sys.modules[f"fastmlm.ops.{name}"]


def _repeat(call, calls: int):
    def step():
        for _ in range(calls):
            call()
    return step


# --------------------------------------------------------------------------- interleaved session (CPU)
_SESSIONS: dict[tuple, dict[str, tuple[float, float, float]]] = {}  # (label, dtype, device) -> provider -> µs


def interleave(calls: dict, per_round: int, rounds: int, clock=time.thread_time) -> dict[str, tuple]:
    """{provider: call} -> {provider: (median, p20, p80) µs per call} over ``rounds`` rounds.

    Each round runs ``per_round`` calls of every provider, the order rotating from round to
    round, each call timed alone; a round's figure is the median of its calls. Alternating at
    this grain keeps a load that comes and goes from landing on one provider only.
    """
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for call in calls.values():  # warm-up: lazy imports, first allocations
        call()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call, times = calls[name], []
            for _ in range(per_round):
                t0 = clock()
                call()
                times.append(clock() - t0)
            samples[name].append(statistics.median(times) * 1e6)
    return {name: (statistics.median(x), percentile(x, 20), percentile(x, 80)) for name, x in samples.items()}


def _session(shape: dict, dtype: torch.dtype, device: str) -> dict[str, tuple]:
    """The interleaved figures of every provider that can run ``shape`` here, measured once."""
    key = (label(shape), shape["calls"], shape["rounds"], dtype, device)
    if key not in _SESSIONS:
        calls = {}
        for provider in providers(shape, device):
            try:
                calls[provider] = _call(provider, shape, dtype, device)[0]
            except Skip:
                continue
        _SESSIONS[key] = interleave(calls, shape["calls"], shape["rounds"])
    return _SESSIONS[key]


def per_call_us(row: dict) -> float:
    """A time row's µs per call: the interleaved median its note carries, else the harness's step median."""
    found = _NOTE.search(row.get("note") or "")
    return float(found.group(1)) if found else row["median"] * 1e3 / row["params"]["calls"]


def _chosen_backend(registry, inputs, device_type: str):
    """The backend module ``auto`` picks for ``inputs`` (Skip when it is the reference: nothing to compare)."""
    name = registry.chosen("auto", device_type, inputs)
    if name == "reference":
        raise Skip("auto picks the reference here: there is no backend call to compare with")
    return registry.module(name)


def _grads_of(loss_or_out, leaves, upstream=None):
    return torch.autograd.grad(loss_or_out, leaves, upstream)


# --------------------------------------------------------------------------- attention
def _attention(provider: str, shape: dict, dtype: torch.dtype, device: str):
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
            return out
    elif provider == "backend":
        mod = _chosen_backend(A.REGISTRY, inputs, q.device.type)

        def call():
            if not grad:  # the inputs want no gradient: nothing to record, so no no_grad context (a few µs);
                return dispatch.forward_out(mod, inputs)  # and the out alone, as attention(...) asks for it
            with torch.no_grad():
                out, lse = mod.forward(inputs)
                mod.backward(inputs, out, lse, upstream)
            return out
    elif provider == "torch":  # what a user of PyTorch writes for the packed layout
        if layout != "packed":
            raise Skip("the plain-PyTorch peer of the padded layouts is sdpa")
        flat = padding.flat_index(cu, q.shape[0], s)  # b * s + position of each packed token
        keep = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).to(device)[:, None, None, :]

        def call():
            x = torch.stack((q, k, v))  # (3, T, H, D)
            padded = x.new_zeros(3, b * s, h, d).index_copy(1, flat, x).view(3, b, s, h, d).transpose(2, 3)
            out = F.scaled_dot_product_attention(*padded.unbind(0), attn_mask=keep)  # (B, H, S, D)
            out = out.transpose(1, 2).reshape(b * s, h, d).index_select(0, flat)
            if grad:
                _grads_of(out, (q, k, v), upstream)
            return out
    elif provider == "sdpa":  # what a user of PyTorch writes for the padded layouts
        if layout == "packed":
            raise Skip("F.scaled_dot_product_attention has no packed layout")
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views
        keep = None if mask is None else mask[:, None, None, :]

        def call():
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep)
            if grad:
                _grads_of(out, (q, k, v), upstream.transpose(1, 2))
            return out.transpose(1, 2)
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
    return call, (q, k, v)


# --------------------------------------------------------------------------- masked_lm_loss
def _masked_lm_loss(provider: str, shape: dict, dtype: torch.dtype, device: str):
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
        fraction = M.DEFAULT_MAX_MASKED_FRACTION.get(hidden.device.type, 1.0)  # what masked_lm_loss resolves
        inputs = M.MaskedCEInputs(hidden, weight, bias, labels, None, -100, 0.0, 0.0, fraction)
        name = M.REGISTRY.chosen("auto", hidden.device.type, inputs)
        if name == "reference":
            raise Skip("auto picks the reference here: there is no backend call to compare with")

        def call():  # the call fastmlm makes: the reduced mean, gradients computed in its forward
            if not grad:  # as for attention: no no_grad context where nothing would be recorded
                return M.reduced(name, inputs, True, False)
            with torch.no_grad():
                return M.reduced(name, inputs, True, True)
    else:  # what a user writes instead: gather the labelled rows, project, cross-entropy
        rows = (labels != -100).nonzero().squeeze(1)  # built once: the peer is given its rows

        def call():
            loss = F.cross_entropy(F.linear(hidden[rows], weight, bias).float(), labels[rows])
            if grad:
                _grads_of(loss, leaves)
    return call, leaves


def _call(provider: str, shape: dict, dtype: torch.dtype, device: str):
    """(one call of ``provider`` at ``shape``, the leaves whose gradients it makes); Skip when it cannot run."""
    if shape["case"] == "masked_lm_loss":
        return _masked_lm_loss(provider, shape, dtype, device)
    return _attention(provider, shape, dtype, device)


def make(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    call, leaves = _call(provider, shape, dtype, device)
    calls = shape["calls"]

    def check() -> str:
        call()  # runs (and raises if the provider cannot); correctness is the ops' tests' and the op benches' job
        zero_grads(*leaves)
        note = f"{calls} calls per step"
        if device == "cpu":
            median, p20, p80 = _session(shape, dtype, device)[provider]
            note += (f"; interleaved µs/call median {median:.2f} p20 {p20:.2f} p80 {p80:.2f} "
                     f"({shape['rounds']} rounds of {calls} calls per provider, thread CPU time)")
        return note
    return Workload(step=_repeat(call, calls), check=check)


# --------------------------------------------------------------------------- report
def report(rows: list[dict]) -> str:
    """Markdown: per case and pass, µs per call of each provider and the time fastmlm adds
    (the interleaved figures where the rows carry them, see :func:`per_call_us`)."""
    per_call: dict[tuple, dict[str, float]] = {}
    spread: dict[tuple, str] = {}
    for r in rows:
        if r["op"] != OP or r["metric"] != "time" or r["median"] is None:
            continue
        key = (r["params"]["case"], r["params"]["pass"], r["dtype"])
        per_call.setdefault(key, {})[r["provider"]] = per_call_us(r)
        found = _NOTE.search(r.get("note") or "")
        if found and r["provider"] == "fastmlm":
            spread[key] = f"{float(found.group(2)):.1f}–{float(found.group(3)):.1f}"
    lines = ["| case | pass | dtype | fastmlm µs | backend µs | added over backend µs | kernel / torch µs | "
             "added over kernel / torch µs | sdpa µs | autograd floor (sdpa − kernel) µs | "
             "fastmlm p20–p80 µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "—" if x is None else f"{x:.1f}"
    diff = lambda a, b: None if a is None or b is None else a - b
    for key, cell in per_call.items():
        ours, backend, sdpa = cell.get("fastmlm"), cell.get("backend"), cell.get("sdpa")
        floor = cell.get("kernel", cell.get("torch"))
        lines.append(f"| {' | '.join(key)} | {fmt(ours)} | {fmt(backend)} | {fmt(diff(ours, backend))} | "
                     f"{fmt(floor)} | {fmt(diff(ours, floor))} | {fmt(sdpa)} | "
                     f"{fmt(diff(sdpa, cell.get('kernel')))} | {spread.get(key, '—')} |")
    return "\n".join(lines)
