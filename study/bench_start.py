"""`python -m study.bench_start`: what a cached side-method trial costs before it trains.

A trial that reads the activation cache should pay for what it reads, not for the whole
frozen backbone. This runs one cached trial (the cache is built first, in a separate
process) in a fresh process and prints: seconds from `train()` to the first training
step, the process's peak RSS, and the trial's memory/FLOPs columns with their source.
Every figure is wall-clock / getrusage on this machine (noisy on a shared CPU).

    python -m study.bench_start --backbone smollm2-135m --method read
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def _one(args: argparse.Namespace, out: Path) -> dict:
    """Run the trial in this process; time to the first batch drawn from the training reader."""
    import torch

    from trainables import cache
    from trainables.loop import RunConfig, train

    torch.set_num_threads(args.threads)
    first: list[float] = []
    batches = cache.TapReader.batches

    def timed(self, batch_size, *, shuffle=False, seed=0):  # a timing probe on the training reader only
        for b in batches(self, batch_size, shuffle=shuffle, seed=seed):
            if shuffle and not first:
                first.append(time.perf_counter())
            yield b

    cache.TapReader.batches = timed  # type: ignore[method-assign]
    cfg = RunConfig(backbone=args.backbone, method=args.method, task=args.task, train_size=args.train_size,
                    max_length=args.max_length, epochs=1, batch_size=args.batch_size, max_train_batches=2,
                    max_eval_examples=32, device="cpu", cache_dir=str(args.cache_dir))
    start = time.perf_counter()
    summary = train(cfg, out)
    return {"status": summary["status"], "error": summary["error"], "cache_hit": summary["cache_hit"],
            "cache_reason": summary["cache_reason"],
            "s_to_first_step": (first[0] - start) if first else None, "trial_s": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_mib": None if summary["peak_memory_bytes"] is None else summary["peak_memory_bytes"] / MIB,
            "memory_source": summary["memory_source"], "flops_per_step": summary["flops_per_step"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.bench_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="smollm2-135m")
    p.add_argument("--method", default="read")
    p.add_argument("--task", default="vader-movies")
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(_one(args, Path(tmp))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        args.cache_dir = args.cache_dir or Path(tmp) / "activations"
        cmd = [sys.executable, "-m", "study.bench_start", "--child", "--backbone", args.backbone,
               "--method", args.method, "--task", args.task, "--train-size", str(args.train_size),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--cache-dir", str(args.cache_dir)]
        runs = []
        for label in ("build", "cached"):  # the first builds the cache, the second is the measured one
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"error: {label} run failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"{label}: status {r['status']}, cache {r['cache_hit']} ({r['cache_reason']}); "
                  f"to first step {r['s_to_first_step']:.2f} s, trial {r['trial_s']:.2f} s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB; step memory {r['peak_memory_mib']} MiB "
                  f"({r['memory_source']}), flops/step {r['flops_per_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
