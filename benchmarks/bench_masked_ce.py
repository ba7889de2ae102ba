"""Benchmark of fastmlm.ops.masked_lm_loss (gather + vocab projection + cross-entropy).

One step is loss forward + backward (gradients for hidden, weight and bias).
A fraction ``rate`` of the T tokens is masked; their positions (R of them) are
computed once, outside the timed call, as a data collator would.

Providers:
  reference       fastmlm's oracle over *all* T tokens (what BertForMaskedLM does:
                  project every token, cross-entropy with ignore_index), fp32 logits
  torch-gathered  the plain-PyTorch user fix: gather the R masked rows, F.linear in
                  the input dtype, F.cross_entropy on fp32 logits
  fastmlm-torch / -triton / -cuda   masked_lm_loss(..., positions=positions)
  fastmlm-<backend>-labels          masked_lm_loss(hidden, weight, bias, labels): as the README
                  calls it, full hidden and labels with -100, no positions
  liger           Liger Kernel's fused linear cross-entropy on the gathered rows
  cce             Cut Cross-Entropy's linear_cross_entropy on the gathered rows, at its
                  defaults (its gradient filter skips the blocks whose softmax is below
                  a threshold: an approximation, checked like every provider)
  cce-exact       the same with filter_eps=None: exact gradients, the equal-work peer
  (CCE takes no bias: both fold it into the projection, see _cce; the copies count in its time)

FLOPs are the useful work on the R masked rows: 2*R*H*V forward, 4*R*H*V backward.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from fastmlm.ops import masked_lm_loss, masked_lm_loss_reference
from fastmlm.testing import check_error_ratios, oracle_dtype, outputs_and_grads, reference_runs

from .common import (fastmlm_backend, generator, preset_dtypes, preset_shapes, randn, require_backend_device,
                     require_module, zero_grads)
from .harness import Skip, Workload

OP = "masked_lm_loss"
NAMES = ("loss", "dh", "dw", "db")  # the checked tensors: the loss, then the gradients of hidden, weight, bias
LABELS = "-labels"  # provider suffix: called without positions
RATIOS = {"loss": 2.0, "dh": 3.0, "dw": 3.0, "db": 3.0}  # the error-ratio rule: outputs 2x, gradients 3x


def _shape(tokens, hidden, vocab, rate=0.15):
    return {"tokens": tokens, "hidden": hidden, "vocab": vocab, "rate": rate, "pass": "fwd+bwd"}


SHAPES = {  # preset -> its shapes
    "smoke": [_shape(64, 16, 123)],
    # BERT-base head; memory against masked tokens up to issue 4's 32k tokens
    "cpu": [_shape(t, 768, 30522) for t in (4096, 32768)],
    "gpu-check": [_shape(t, 768, 30522) for t in (8192, 32768)],
    "gpu": [_shape(t, 768, 30522) for t in (4096, 8192, 16384, 32768, 65536)],
}
shapes, dtypes = preset_shapes(SHAPES), preset_dtypes


def label(shape: dict) -> str:
    return f"T={shape['tokens']} H={shape['hidden']} V={shape['vocab']} masked={shape['rate']:.0%}"


def providers(shape: dict, device: str) -> list[str]:
    fastmlm = [f"fastmlm-{b}{how}" for b in ("torch", "triton", "cuda") for how in ("", LABELS)]
    return ["reference", "torch-gathered", *fastmlm, *PEERS]


# --------------------------------------------------------------------------- inputs
def _inputs(shape: dict, dtype, device):
    t, hsz, vocab = shape["tokens"], shape["hidden"], shape["vocab"]
    gen = generator(0)
    hidden = randn((t, hsz), dtype, device, gen)
    weight = randn((vocab, hsz), dtype, device, gen, scale=hsz ** -0.5)
    bias = randn((vocab,), dtype, device, gen, scale=0.1)
    masked = torch.rand(t, generator=gen) < shape["rate"]
    masked[0] = True  # at least one counted row
    labels = torch.where(masked, torch.randint(0, vocab, (t,), generator=gen), -100)
    positions = masked.nonzero()[:, 0]
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
    return leaves, labels.to(device), positions.to(device)


_CGROUPS = (  # (folder, limit file, usage file, the memory.stat entry of its reclaimable page cache): v2, v1
    ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
    ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)


def _available_bytes(meminfo: str = "/proc/meminfo", cgroups=_CGROUPS) -> int:
    """Memory this process could still take: the kernel's MemAvailable, capped by a cgroup limit.

    Not ``SC_AVPHYS_PAGES``: that counts only free pages, and on a machine whose page cache fills
    its memory (a CI runner after a clone and a pip install) it is near zero although the cache
    gives way at once. A cgroup's usage counts its page cache too; the inactive part of that
    cache gives way as well. Unreadable or absent files are skipped (no limit known: 2**62).
    """
    avail = 1 << 62
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for folder, limit_name, usage_name, cache_name in cgroups:
        try:
            limit = Path(folder, limit_name).read_text().strip()
            usage = int(Path(folder, usage_name).read_text())
            stat = dict(line.split() for line in Path(folder, "memory.stat").read_text().splitlines()
                        if line.count(" ") == 1)
            cache = int(stat.get(cache_name, 0))
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max" (cgroup v2): no limit
            avail = min(avail, max(int(limit) - usage + cache, 0))
    return avail


def _liger(dtype):
    module = require_module("liger_kernel.transformers", "Liger Kernel")
    loss_fn = module.LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

    def run(h, w, b, labels, positions):
        out = loss_fn(w, h[positions], labels[positions], b)  # (weight, input, target, bias)
        return out[0] if isinstance(out, tuple) else out

    return run


FOLD_COLUMNS = 8  # bias column + zero padding: rows of 2-byte elements stay a multiple of 16 bytes long


def _cce(dtype, exact: bool):
    """Cut Cross-Entropy on the gathered rows, with the bias folded into the projection.

    ``linear_cross_entropy(e, c, targets)`` computes ``e @ c.T`` with no bias, and the MLM head has
    one, so the rows get a column of ones and the classifier the bias as that column:
    ``[e, 1, 0..] @ [c, b, 0..].T = e @ c.T + b``, gradients of all three through ``torch.cat``. A user
    of CCE with a BERT head has to do the same, and so its time counts here: the classifier's V x (H+8)
    copy, and the split of its gradient.
    """
    module = require_module("cut_cross_entropy", "Cut Cross-Entropy")
    if dtype not in (torch.float16, torch.bfloat16):
        raise Skip(f"Cut Cross-Entropy's backward takes bf16 or fp16 hidden states, not {dtype}")
    filter_eps = None if exact else "high"  # "high": the package's default

    def run(h, w, b, labels, positions):
        rows = h[positions]
        one = torch.zeros(1, FOLD_COLUMNS, dtype=h.dtype, device=h.device)
        one[0, 0] = 1
        e = torch.cat([rows, one.expand(rows.shape[0], -1)], dim=1)
        c = torch.cat([w, b[:, None], w.new_zeros(w.shape[0], FOLD_COLUMNS - 1)], dim=1)
        return module.linear_cross_entropy(e, c, labels[positions], filter_eps=filter_eps)

    return run


# The peers a user would pick instead, each a Triton GPU package: name -> builder(dtype) -> loss function.
PEERS = {"liger": _liger,
         "cce": functools.partial(_cce, exact=False),
         "cce-exact": functools.partial(_cce, exact=True)}


def _provider_fn(provider: str, device: str, dtype: torch.dtype):
    if provider.endswith(LABELS):  # no positions: the op finds the masked rows itself
        backend = fastmlm_backend(provider[: -len(LABELS)])
        if backend is None:
            raise ValueError(f"unknown masked_lm_loss provider {provider!r}")
        require_backend_device(backend, device)
        return lambda h, w, b, labels, positions: masked_lm_loss(h, w, b, labels, backend=backend)
    backend = fastmlm_backend(provider)
    if provider == "reference":
        return lambda h, w, b, labels, positions: masked_lm_loss(h, w, b, labels, backend="reference")
    if backend is not None:
        require_backend_device(backend, device)
        return lambda h, w, b, labels, positions: masked_lm_loss(h, w, b, labels, positions=positions,
                                                                 backend=backend)
    if provider == "torch-gathered":
        return lambda h, w, b, labels, positions: F.cross_entropy(F.linear(h[positions], w, b).float(),
                                                                  labels[positions])
    if provider in PEERS:
        if not device.startswith("cuda"):
            raise Skip(f"{provider} is a set of Triton GPU kernels")
        return PEERS[provider](dtype)
    raise ValueError(f"unknown masked_lm_loss provider {provider!r}")


# --------------------------------------------------------------------------- workload
def make(provider: str, shape: dict, dtype: torch.dtype, device: str) -> Workload:
    t, vocab = shape["tokens"], shape["vocab"]
    if provider == "reference" and device == "cpu":
        # Autograd keeps several (T, V) fp32 tensors alive at once (logits, biased logits, their
        # gradient, softmax temporaries): measured at about 5x the logits' bytes.
        need = 5 * t * vocab * 4
        if need > 0.6 * _available_bytes():
            raise Skip(f"the all-tokens reference needs about {need / 2**20:,.0f} MiB; "
                       f"{_available_bytes() / 2**20:,.0f} MiB available")
    fn = _provider_fn(provider, device, dtype)
    (h, w, b), labels, positions = _inputs(shape, dtype, device)

    def step():
        fn(h, w, b, labels, positions).backward()
        zero_grads(h, w, b)  # after, not before: the peak-memory baseline then holds no gradients

    def check() -> str:
        fast = outputs_and_grads(lambda h, w, b: fn(h, w, b, labels, positions), (h, w, b), names=NAMES)
        fast["loss"] = fast["loss"].float()
        exact, lowp = _oracle(shape_key(shape), dtype, device)
        return check_error_ratios(fast, exact, lowp, RATIOS)

    rows = positions.numel()
    return Workload(step=step, check=check, flops=6.0 * rows * shape["hidden"] * vocab)


def shape_key(shape: dict) -> tuple:
    return tuple(sorted(shape.items()))


@functools.lru_cache(maxsize=1)
def _oracle(key: tuple, dtype, device):
    """(exact, low-precision) loss and gradients of the reference on the gathered rows; cached per shape."""
    (h, w, b), labels, positions = _inputs(dict(key), dtype, device)

    def reference(h, w, b, upcast):
        rows, _, _ = masked_lm_loss_reference(h, w, b, labels, positions, upcast=upcast)
        return rows.sum() / positions.numel()

    runs = reference_runs(reference, (h, w, b), low_dtype=dtype, exact_dtype=oracle_dtype(device), names=NAMES)
    for run in runs:
        run["loss"] = run["loss"].float()
    return runs
