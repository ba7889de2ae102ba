"""pytest-benchmark micro-benchmarks of the CPU paths (not part of ``make test``, which collects tests/ only).

    .venv/bin/python -m pytest benchmarks/ --benchmark-only [--benchmark-group-by=group]

Each benchmark first checks its provider against the reference (the same check the
benchmark programs run), then lets pytest-benchmark time ``Workload.step``
(forward + backward). Shapes are small so the whole file runs in about a minute.
"""
import pytest
import torch

from benchmarks import bench_attention, bench_block_sparse, bench_masked_ce

CASES = [
    pytest.param(bench_attention, {"batch": 4, "seqlen": 128, "heads": 4, "head_dim": 64, "layout": "padded",
                                   "pass": "fwd+bwd"}, p, id=f"attention-{p}")
    for p in ("reference", "fastmlm-torch", "sdpa-flash", "sdpa-math")
] + [
    pytest.param(bench_masked_ce, {"tokens": 1024, "hidden": 256, "vocab": 4096, "rate": 0.15, "pass": "fwd+bwd"},
                 p, id=f"masked_ce-{p}")
    for p in ("reference", "torch-gathered", "fastmlm-torch")
] + [
    pytest.param(bench_block_sparse, {"batch": 1, "seqlen": 512, "heads": 4, "head_dim": 64, "density": 0.25,
                                      "block": 64, "pass": "fwd+bwd"}, p, id=f"block_sparse-{p}")
    for p in ("reference", "fastmlm-torch", "dense-torch")
]


@pytest.mark.parametrize("bench,shape,provider", CASES)
def test_cpu_path(benchmark, bench, shape, provider):
    benchmark.group = f"{bench.OP} {bench.label(shape)}"
    workload = bench.make(provider, shape, torch.float32, "cpu")
    benchmark.extra_info["check"] = workload.check()
    benchmark.pedantic(workload.step, rounds=5, warmup_rounds=1)
