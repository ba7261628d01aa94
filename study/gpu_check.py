"""`make gpu-check` (`python -m study.gpu_check`): the pretrained path on one GPU, in a few minutes.

Fine-tunes the pretrained smollm2-135m (through the hub-id path, the offline asset here)
with READ and LoRA in bf16 for a few steps, live (no activation cache, so the measured
step runs the backbone), and prints per method: the CUDA-measured peak of one step next to
the fake-tensor estimate of the same step (target: within 10%), NVML energy, throughput.
Without a GPU it prints "skipped: no GPU" and exits 0. Exit 1 when a trial fails or an
estimate is more than 10% off.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("read", "lora")
TOLERANCE = 0.10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no GPU (torch.cuda.is_available() is False)")
        return 0
    from trainables import tasks
    from trainables.backbones import get_spec
    from trainables.loop import RunConfig, epoch_seed, train
    from trainables.memory import estimate_step
    from trainables.trial import load_data

    print(f"gpu: {torch.cuda.get_device_name(0)}, backbone {args.backbone} (pretrained, bf16), "
          f"batch {args.batch_size} × ≤{args.max_length} tokens, {args.steps} steps")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            cfg = RunConfig(backbone=args.backbone, method=method, task="vader-movies", train_size=args.batch_size
                            * args.steps, max_length=args.max_length, epochs=1, batch_size=args.batch_size,
                            max_eval_examples=128, device="cuda", dtype="bf16", weights="pretrained", cache=False)
            start = time.perf_counter()
            s = train(cfg, Path(tmp) / method)
            wall = time.perf_counter() - start
            if s["status"] != "ok":
                print(f"{method}: FAILED {s['status']}: {s['error']}")
                ok = False
                continue
            task, _ = load_data(cfg, get_spec(cfg.backbone))  # the measured step's batch shape
            first = next(tasks.batches(task.train, cfg.batch_size, pad_token_id=task.pad_token_id, shuffle=True,
                                       seed=epoch_seed(cfg.seed, 0)))
            b, t = first["input_ids"].shape
            est = estimate_step(cfg.backbone, method, None, batch_size=b, seq_len=t, dtype=torch.bfloat16,
                                n_labels=task.n_labels).peak_bytes
            off = s["peak_memory_bytes"] / est - 1
            ok &= abs(off) <= TOLERANCE and s["memory_source"] == "cuda"
            energy = "n/a" if s["energy_joules"] is None else f"{s['energy_joules']:.1f} J"
            print(f"{method}: peak {s['peak_memory_bytes'] / 2**20:.1f} MiB ({s['memory_source']}) vs estimate "
                  f"{est / 2**20:.1f} MiB (estimated, batch {b}×{t}): {off:+.1%} "
                  f"{'ok' if abs(off) <= TOLERANCE else 'OFF BY MORE THAN 10%'}; energy {energy} "
                  f"({s['energy_source']}); {s['tokens_per_s'] or 0:.0f} tokens/s; {s['best_metric']:.3f} "
                  f"{s['metric_name']}; revision {s['backbone_revision']}; wall {wall:.1f} s")
    print("gpu-check: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
