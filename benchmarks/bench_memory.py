"""Peak memory per rank of one training step: DDP, FSDP, FSDP + activation checkpointing (issue 19).

    python -m benchmarks.bench_memory                      # base, s512, batch 2 per rank, 2 CPU ranks
    python -m benchmarks.bench_memory --batch-size 8 --out benchmarks/results/2026-12-01-H100-memory.md

Each mode runs in ``torchrun`` processes of its own (one rank per process; GPUs when there
are enough, else the CPU with gloo). Each rank builds the model (``--model`` preset, vocabulary
30522), wraps it as ``fastmlm train`` does, runs one step (the optimizer's state is created
then) and measures the next one:

* CPU: the process's peak RSS (VmHWM) during the step, and the RSS just before it (weights,
  gradients, optimizer state, runtime), with glibc returning freed blocks to the OS
  (benchmarks.harness settings), so RSS follows the live tensors;
* GPU: ``torch.cuda.max_memory_allocated`` during the step.

Beside each, the memory plan of ``fastmlm train --dry-run`` for the same settings. The table
(markdown) is printed and, with ``--out``, written with the command, host and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

MODES = {"ddp": dict(fsdp=False, activation_checkpointing=False),
         "fsdp": dict(fsdp=True, activation_checkpointing=False),
         "fsdp+ac": dict(fsdp=True, activation_checkpointing=True)}
MIB = 1024 ** 2


def _config(args, mode: str):
    from fastmlm.config import TrainConfig

    return TrainConfig(model=args.model, vocab_size=30522, seq_len=args.seq_len, batch_size=args.batch_size,
                       precision=args.precision, device=args.device, model_overrides={"hidden_dropout": 0.0},
                       **MODES[mode]).validate()


def worker(args) -> None:
    """One rank of one mode: write ``rank<N>.json`` into ``--result-dir``."""
    import torch

    from benchmarks.harness import _status_kib, rss_peak_of_call
    from fastmlm import memory_plan, train
    from fastmlm.distributed import setup_distributed, wrap_model
    from fastmlm.model import FastMLMForMaskedLM

    cfg = _config(args, args.worker)
    ranks, device = setup_distributed(cfg.device)
    torch.manual_seed(0)
    model = FastMLMForMaskedLM(train.sized_model_config(cfg, cfg.vocab_size)).to(device)
    if cfg.activation_checkpointing:
        model.set_activation_checkpointing("selective")
    amp = train.autocast_dtype(cfg, device)
    net = wrap_model(model, ranks, device, cfg.fsdp, amp)
    optimizer = train.make_optimizer(model, cfg)
    batch = memory_plan.synthetic_batch(cfg, cfg.vocab_size, cfg.batch_size, cfg.seq_len)

    def step():
        train.accumulate_gradients(net, [batch], device, amp, None, ranks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ranks.barrier()

    step()  # the optimizer's state exists from here on
    result = {"rank": ranks.rank, "world_size": ranks.world_size, "device": str(device)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result["resident_bytes"] = torch.cuda.memory_allocated(device)
        began = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["resident_bytes"] = _status_kib("VmRSS") * 1024
        began = time.perf_counter()
        result["peak_bytes"] = result["resident_bytes"] + rss_peak_of_call(step, warm_up=False)
    result["step_s"] = time.perf_counter() - began
    (Path(args.result_dir) / f"rank{ranks.rank}.json").write_text(json.dumps(result))


def run_mode(args, mode: str, nproc: int) -> list[dict]:
    import tempfile

    from benchmarks.harness import _WORKER_ENV

    result_dir = tempfile.mkdtemp(prefix="bench_memory_")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **_WORKER_ENV, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    forwarded = ["--model", args.model, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                 "--precision", args.precision, "--device", args.device, "--result-dir", result_dir]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--standalone", "-m", "benchmarks.bench_memory", "--worker", mode, *forwarded],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    rows = [json.loads(f.read_text()) for f in Path(result_dir).glob("rank*.json")]  # not stdout: ranks interleave
    if proc.returncode != 0 or len(rows) != nproc:
        raise RuntimeError(f"{mode}: torchrun failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="base")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2, help="rows per rank (default 2: a CPU's reduced batch)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto", help="auto: a GPU per rank when there are enough, else the CPU")
    p.add_argument("--nproc", type=int, default=2, help="ranks per mode")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--timeout-s", type=float, default=1200)
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--worker", choices=tuple(MODES), help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    from benchmarks.harness import environment
    from fastmlm import memory_plan

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.device_count() >= args.nproc else "cpu"
    lines = [f"| mode | rank | peak MiB | resident before the step MiB | step s | plan total MiB (dry-run) |",
             "|---|---|---|---|---|---|"]
    for mode in args.modes.split(","):
        cfg = _config(args, mode)
        planned = memory_plan.plan(cfg, args.nproc, fsdp=cfg.fsdp).total
        for row in run_mode(args, mode, args.nproc):
            lines.append(f"| {mode} | {row['rank']} | {row['peak_bytes'] / MIB:,.0f} | "
                         f"{row['resident_bytes'] / MIB:,.0f} | {row['step_s']:.1f} | {planned / MIB:,.0f} |")
        print(lines[-1], flush=True)
    env = environment(args.device)
    head = [f"# Peak memory per rank of one training step ({args.model}, s{args.seq_len}, batch {args.batch_size} "
            f"per rank, {args.nproc} ranks, {args.device})", "",
            f"Command: `python -m benchmarks.bench_memory {shlex.join(argv if argv is not None else sys.argv[1:])}`",
            "Host: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "threads")
            + f"; {args.threads} CPU thread(s) per rank (load: the 1/5/15-minute load average at the end; the CPU "
              f"host is shared)", "",
            "CPU: peak = the process's VmHWM during the measured step (RSS, so it includes the Python and torch "
            "runtime); GPU: torch.cuda.max_memory_allocated. Plan: `fastmlm train --dry-run` for the same "
            "settings (tensors only, no runtime).", ""]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
