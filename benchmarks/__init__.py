"""fastmlm's benchmark suite: programs, not tests (see ARCHITECTURE.md, "Benchmarks").

    python -m benchmarks --cpu              # CPU figures: tables, rows, plots under benchmarks/results/
    python benchmarks/gpu_check.py --out D  # the one GPU entry point (make gpu-check)
    python -m pytest benchmarks/ --benchmark-only   # pytest-benchmark micro-benchmarks of the CPU paths

One ``bench_<op>.py`` per op plus ``bench_train_step.py``; each exposes OP, shapes(preset),
dtypes(preset), label(shape), providers(shape, device) and make(provider, shape, dtype, device)
-> harness.Workload. harness.py checks, times, measures memory and writes the rows.
"""
