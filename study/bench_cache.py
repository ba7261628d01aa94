"""`python -m study.bench cache`: what the activation cache saves a hyperparameter search.

A sweep of N trials × E epochs of one side method (READ, then LST) runs sequentially
in-process through `trainables.loop.train` three times:
1. uncached: every step runs the frozen backbone;
2. cached: a fresh cache folder, so the first trial builds the caches and the others read;
3. side only: the same trials with the caches already loaded in memory (no build, no
   disk): the floor the cached sweep is held to (`cached_s <= 1.2 × (build + side only)`).
One uncached LoRA trial gives the scale of a graft method. From the measured per-trial
overhead and per-epoch times it derives how the speedup grows with trials × epochs,
and it prints the cache's bytes on disk per 1,000 examples for a few backbones.
Every time is wall-clock on this machine's CPU; sizes are exact or (llama-7b) by formula.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from study import spaces
from trainables import cache
from trainables.backbones import get_spec, tokenizer_here
from trainables.loop import RunConfig, load_data, train

MIB = 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sample_hps(method: str, n: int, seed: int) -> list[dict[str, Any]]:
    """n draws from the study's own search space, by Optuna's seeded random sampler."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line per method
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(spaces.space(method)).params for _ in range(n)]


def run_config(args: argparse.Namespace, method: str, hp: dict[str, Any], **overrides: Any) -> RunConfig:
    run_hp, method_hp = spaces.split_hp(hp)
    return RunConfig(backbone=args.backbone, method=method, method_config=method_hp, task=args.task,
                     train_size=args.train_size, max_length=args.max_length, epochs=args.epochs,
                     batch_size=args.batch_size, max_eval_examples=args.max_eval_examples, seed=args.seed,
                     device="cpu", cache_dtype=args.cache_dtype, **(run_hp | overrides))


def sweep(args: argparse.Namespace, method: str, hps: list[dict[str, Any]], out: Path, label: str,
          **overrides: Any) -> dict[str, Any]:
    """Run the trials one after another: total wall time, and per-trial overhead and per-epoch times.

    The split uses medians (of epochs, and of each trial's time outside its epochs), which
    a burst of load from other processes on a shared machine moves far less than means.
    """
    start = time.perf_counter()
    epochs, overheads, metrics = [], [], []
    for i, hp in enumerate(hps):
        t0 = time.perf_counter()
        summary = train(run_config(args, method, hp, **overrides), out / f"{label}-{i}")
        wall = time.perf_counter() - t0
        if summary["status"] != "ok":
            raise RuntimeError(f"{method} {label} trial {i}: {summary['status']}: {summary['error']}")
        ends = [json.loads(line)["wall_time_s"] for line in (out / f"{label}-{i}" / "epochs.jsonl").open()]
        epochs.extend(np.diff([0.0, *ends]).tolist())
        overheads.append(wall - ends[-1])
        metrics.append(summary["best_metric"])
        log(f"  {method} {label} {i + 1}/{len(hps)}: {wall:.1f}s, best {summary['best_metric']:.3f}, "
            f"cache {summary['cache_hit']} ({summary['cache_reason']})")
    return {"wall_s": time.perf_counter() - start, "per_epoch_s": float(np.median(epochs)),
            "per_trial_overhead_s": float(np.median(overheads[1:] if len(overheads) > 1 else overheads)),
            "epoch_s": epochs, "overhead_s": overheads, "best_metrics": metrics}


def bench_method(args: argparse.Namespace, method: str, work: Path) -> dict[str, Any]:
    hps = sample_hps(method, args.trials, args.seed)
    root = work / f"cache-{method}"
    log(f"{method}: {args.trials} trials × {args.epochs} epochs, uncached ...")
    uncached = sweep(args, method, hps, work, f"{method}-uncached", cache=False)
    cache.forget()
    log(f"{method}: cached (fresh folder: the first trial builds) ...")
    cached = sweep(args, method, hps, work, f"{method}-cached", cache_dir=str(root))
    manifests = [json.loads(p.read_text()) for p in sorted(root.glob("*/manifest.json"))]
    build_s = sum(m["build_s"] for m in manifests)  # inside the first trial's overhead, left out of the median
    cache.forget()
    side = None
    if method in args.side_only:
        for folder in sorted(p.parent for p in root.glob("*/manifest.json")):
            cache.preload(folder)
        log(f"{method}: side only (caches already in memory) ...")
        side = sweep(args, method, hps, work, f"{method}-side", cache_dir=str(root))
        cache.forget()
    d, key = get_spec(args.backbone).d_model, manifests[0]["key"]
    taps = len(key["taps"])
    padded = sum(cache.padded_bytes(m["examples"], taps, d, args.max_length, args.cache_dtype) for m in manifests)
    packed = sum(cache.estimate_bytes(np.array([m["tokens"]]), taps, d, "all", args.cache_dtype) for m in manifests)
    row = {"uncached_s": uncached["wall_s"], "cached_s": cached["wall_s"], "cache_build_s": build_s,
           "side_only_s": side and side["wall_s"], "speedup": uncached["wall_s"] / cached["wall_s"],
           "cache_bytes": sum(m["bytes"] for m in manifests), "all_token_bytes": packed,
           "padded_cache_bytes": padded, "positions": key["positions"], "taps": taps,
           "cached_within_target": side and cached["wall_s"] <= 1.2 * (build_s + side["wall_s"]),
           "uncached": uncached, "cached": cached, "side_only": side, "hps": hps}
    row["growth"] = growth(row)
    return row


def growth(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Speedup for other sweep sizes, from the median per-trial overhead and epoch time, and the build."""
    u, c = row["uncached"], row["cached"]
    out = []
    for trials in (1, 8, 32):
        for epochs in (1, 5, 20):
            live = trials * (u["per_trial_overhead_s"] + epochs * u["per_epoch_s"])
            cached = row["cache_build_s"] + trials * (c["per_trial_overhead_s"] + epochs * c["per_epoch_s"])
            out.append({"trials": trials, "epochs": epochs, "speedup": live / cached})
    return out


def sizes_per_1000(max_length: int, dtype: str) -> dict[str, Any]:
    """Bytes per 1,000 examples of vader-movies: pooled, packed real tokens, padded (φ_0..φ_L)."""
    item = cache.STORAGE_DTYPES[dtype].itemsize
    out: dict[str, Any] = {}
    mean_len: dict[str, float] = {}
    for name in ("minilm-l6", "smollm2-135m", "llama-7b"):
        spec = get_spec(name)
        if tokenizer_here(spec):
            task, _ = load_data(RunConfig(backbone=name, train_size=None, max_length=max_length), spec)
            mean_len[name] = float(np.mean([len(r) for r in task.train["input_ids"]]))
            source = f"{spec.tokenizer} tokenizer on vader-movies"
        else:
            mean_len[name] = mean_len["smollm2-135m"]
            source = "formula; mean length of the smollm2 (BPE) tokenizer as a stand-in"
        per_token = (spec.n_layers + 1) * spec.d_model * item * 1000
        out[name] = {"pooled": per_token, "all_tokens": int(per_token * mean_len[name]),
                     "padded": per_token * max_length, "mean_tokens": mean_len[name], "source": source}
    return out


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    out: dict[str, Any] = {"backbone": args.backbone, "task": args.task, "train_size": args.train_size,
                           "trials": args.trials, "epochs": args.epochs, "threads": args.threads,
                           "cache_dtype": args.cache_dtype, "device": "cpu"}
    try:
        for method in args.methods:
            out[method] = bench_method(args, method, work)
        if args.lora:
            log("lora: one uncached trial for scale ...")
            out["lora"] = sweep(args, "lora", sample_hps("lora", 1, args.seed), work, "lora", cache=False)
        out["sizes_per_1000"] = sizes_per_1000(args.max_length, args.cache_dtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        cache.forget()
    first = out[args.methods[0]]
    out |= {k: first[k] for k in ("speedup", "cached_s", "uncached_s", "cache_build_s", "side_only_s",
                                  "cache_bytes", "padded_cache_bytes")}
    report(out, args)
    if args.json:
        print(json.dumps(out, default=float))
    return 0


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.backbone} / {args.task}, train {args.train_size}, batch {args.batch_size} × ≤{args.max_length}, "
          f"{args.trials} trials × {args.epochs} epochs, cpu, {args.threads} threads (wall-clock, measured)")
    print(f"  {'method':<6} {'uncached':>9} {'cached':>8} {'build':>7} {'side':>7} {'speedup':>8} "
          f"{'≤1.2×':>6} {'on disk':>9} {'packed':>9} {'padded':>9}")
    for m in args.methods:
        r = out[m]
        side, ok = ("-", "-") if r["side_only_s"] is None else (f"{r['side_only_s']:.1f}s",
                                                                 "yes" if r["cached_within_target"] else "NO")
        print(f"  {m:<6} {r['uncached_s']:8.1f}s {r['cached_s']:7.1f}s {r['cache_build_s']:6.1f}s "
              f"{side:>7} {r['speedup']:7.1f}× {ok:>6} "
              f"{r['cache_bytes'] / MIB:7.1f}Mi {r['all_token_bytes'] / MIB:7.1f}Mi "
              f"{r['padded_cache_bytes'] / MIB:7.1f}Mi   ({r['positions']} positions, {r['taps']} taps)")
    if "lora" in out:
        print(f"  lora   one uncached trial: {out['lora']['wall_s']:.1f}s "
              f"({out['lora']['per_epoch_s']:.1f}s per epoch)")
    for m in args.methods:
        g = out[m]["growth"]
        cells = "  ".join(f"{x['trials']}×{x['epochs']}: {x['speedup']:.1f}×" for x in g)
        print(f"  {m} speedup by trials × epochs (derived from median overhead/epoch and the build): {cells}")
        r = out[m]
        print(f"  {m} medians: epoch {r['uncached']['per_epoch_s']:.1f}s live, {r['cached']['per_epoch_s']:.1f}s cached; "
              f"trial overhead {r['uncached']['per_trial_overhead_s']:.1f}s live, "
              f"{r['cached']['per_trial_overhead_s']:.1f}s cached")
    print("  bytes per 1,000 examples (bf16 unless --cache-dtype; φ_0..φ_L):")
    for name, s in out["sizes_per_1000"].items():
        print(f"    {name:<13} pooled {s['pooled'] / MIB:8.1f} MiB   all real tokens {s['all_tokens'] / MIB:9.1f} MiB"
              f"   padded to {args.max_length} {s['padded'] / MIB:9.1f} MiB   (mean {s['mean_tokens']:.1f} tokens; "
              f"{s['source']})")
