"""Benchmarks of the framework's own measurements: `python -m study.bench <subcommand>`.

`cache`: a side-method sweep with and without the activation cache (study.bench_cache).

`memory`: peak training-step memory of every registered method, by category, as a
ratio to full fine-tuning, next to the papers' figures:
1. a large model (default llama-7b, bf16, batch 8 × 512), estimated on fake tensors;
2. the LST paper's own setting: T5-base, fp32, batch 100, source length 128, LST with its
   reference layer drop (9 of 12 blocks), estimated, printed beside the paper's GB figures;
3. a small model that also runs for real here (default minilm-l6, random weights, fp32,
   batch 8 × 64): tracked on a real CPU step AND estimated, with the error between them.
Every number says where it came from (estimated / tracked). Progress goes to stderr.

Subcommands are argparse subparsers: add one with a `_add_<name>` function and a
`cmd_<name>(args) -> int`, and list it in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB, MIB = 2**30, 2**20
CATEGORIES = ("params", "grads", "optimizer", "activations")

# Training-memory savings vs full fine-tuning claimed by the papers (METHODS.md).
PAPER = {
    "read": (-0.56, "READ paper: T5 on GLUE"),
    "lst": (-0.69, "LST paper: T5-base fp32, batch 100, len 128, 17.6 -> 5.5 GB"),
    "lora": (-0.26, "LST paper, T5-base"),
    "adapter": (-0.26, "LST paper, T5-base"),
}
# The LST paper's measured peaks (GB, T5-base, fp32, batch 100, source length 128); adapter and LoRA are
# published as a ~26% saving, i.e. about 0.74 x 17.6 GB.
PAPER_GB = {"full": 17.6, "lst": 5.5, "lora": 0.74 * 17.6, "adapter": 0.74 * 17.6}
# Method configs of the papers' T5 runs: LST keeps 9 of T5-base's 12 blocks (drops 0, 4, 8).
PAPER_CONFIGS: dict[str, dict[str, Any]] = {"lst": {"drop_every": 4}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- memory

def _methods(selected: list[str] | None) -> list[str]:
    from trainables.methods import REGISTRY

    names = selected or list(REGISTRY)
    return ["full", *[m for m in names if m != "full"]]  # full first: the others are relative to it


def _report_dict(report: Any) -> dict[str, Any]:
    return {"peak_bytes": report.peak_bytes, **{c: getattr(report, c) for c in CATEGORIES},
            "source": report.source}


def _per_method(methods: list[str], what: str, backbone: str,
                measure: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """`measure` each method in turn, timed and logged; one broken method must not hide the others."""
    rows = []
    for i, method in enumerate(methods, 1):
        start = time.perf_counter()
        try:
            row = {"method": method, **measure(method)}
        except Exception as exc:
            row = {"method": method, "error": f"{type(exc).__name__}: {exc}"}
        row["seconds"] = round(time.perf_counter() - start, 2)
        log(f"  [{i}/{len(methods)}] {backbone} {method}: {what} in {row['seconds']:.1f}s"
            + (f"  FAILED {row['error']}" if "error" in row else ""))
        rows.append(row)
    return rows


def estimated_rows(backbone: str, dtype: str, batch_size: int, seq_len: int, methods: list[str],
                   foreach: bool, configs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One estimated row per method (an `error` key instead where a method fails)."""
    from trainables.memory import estimate_step

    def measure(method: str) -> dict[str, Any]:
        cfg = (configs or {}).get(method)
        report = estimate_step(backbone, method, cfg, batch_size=batch_size, seq_len=seq_len,
                               dtype=DTYPES[dtype], foreach=foreach)
        return {"estimated": _report_dict(report), "config": cfg or {}}

    return _with_ratios(_per_method(methods, "estimated", backbone, measure), "estimated")


def checked_rows(backbone: str, batch_size: int, seq_len: int, methods: list[str]) -> list[dict[str, Any]]:
    """Tracked (real CPU step, random weights, fp32) and estimated side by side, per method."""
    from trainables.backbones import get_spec
    from trainables.memory import build_task_model, estimate_step, measure_step, synthetic_batch

    spec = get_spec(backbone)

    def measure(method: str) -> dict[str, Any]:
        torch.manual_seed(0)
        model = build_task_model(backbone, method, None, device="cpu", dtype=torch.float32)
        batch = synthetic_batch(spec.config["vocab_size"], batch_size, seq_len,
                                pad_token_id=spec.config.get("pad_token_id") or 0)
        tracked = measure_step(model, batch)  # CPU: the trials' fused AdamW
        del model
        estimated = estimate_step(backbone, method, None, batch_size=batch_size, seq_len=seq_len,
                                  dtype=torch.float32, foreach=None)  # the same kernel, on fake tensors
        return {"tracked": _report_dict(tracked), "estimated": _report_dict(estimated),
                "error_vs_tracked": estimated.peak_bytes / tracked.peak_bytes - 1}

    return _with_ratios(_per_method(methods, "tracked + estimated", backbone, measure), "tracked")


def _with_ratios(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    full = next((r[source]["peak_bytes"] for r in rows if r["method"] == "full" and source in r), None)
    for r in rows:
        r["ratio_to_full"] = r[source]["peak_bytes"] / full if full and source in r else None
        claim = PAPER.get(r["method"])
        r["paper_saving"], r["paper_source"] = claim if claim else (None, None)
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def _print_table(title: str, rows: list[dict[str, Any]], source: str, unit: int, unit_name: str) -> None:
    print(f"\n{title}")
    print(f"  {'method':<8} {'peak':>9} {'params':>9} {'grads':>9} {'optim':>9} {'activ':>9}  "
          f"{'vs full':>14}  {'paper':>6}  ({unit_name}, {source})")
    for r in rows:
        if "error" in r:
            print(f"  {r['method']:<8} FAILED: {r['error'][:100]}")
            continue
        m = r[source]
        cells = " ".join(f"{m[k] / unit:9.2f}" for k in ("peak_bytes", *CATEGORIES))
        ratio = r["ratio_to_full"]
        vs_full = "-" if ratio is None else f"x{ratio:.2f} ({_pct(ratio - 1)})"
        print(f"  {r['method']:<8} {cells}  {vs_full:>14}  {_pct(r['paper_saving']):>6}")


def _print_paper_gb(rows: list[dict[str, Any]]) -> None:
    """The estimate beside the LST paper's measured GB (decimal GB, as the paper reports)."""
    print("  beside the LST paper (T5-base, fp32, batch 100, length 128; measured on a GPU):")
    print(f"  {'method':<8} {'estimate GB':>12} {'x full':>7}   {'paper GB':>9} {'x full':>7}")
    for r in rows:
        if "error" in r or r["method"] not in PAPER_GB:
            continue
        est, paper = r["estimated"]["peak_bytes"] / 1e9, PAPER_GB[r["method"]]
        approx = "~" if r["method"] in ("lora", "adapter") else " "
        print(f"  {r['method']:<8} {est:12.1f} {r['ratio_to_full']:7.2f}   {approx}{paper:8.1f} "
              f"{paper / PAPER_GB['full']:7.2f}")


def _print_check(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"  {'method':<8} {'tracked':>9} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8}  "
          f"{'estimated':>9} {'error':>8}  {'vs full':>14}  {'paper':>6}  (MiB)")
    for r in rows:
        if "error" in r:
            print(f"  {r['method']:<8} FAILED: {r['error'][:100]}")
            continue
        t, e = r["tracked"], r["estimated"]
        cells = " ".join(f"{t[k] / MIB:8.2f}" for k in CATEGORIES)
        ratio = r["ratio_to_full"]
        vs_full = "-" if ratio is None else f"x{ratio:.2f} ({_pct(ratio - 1)})"
        print(f"  {r['method']:<8} {t['peak_bytes'] / MIB:9.2f} {cells}  {e['peak_bytes'] / MIB:9.2f} "
              f"{r['error_vs_tracked']:+8.2%}  {vs_full:>14}  {_pct(r['paper_saving']):>6}")


def _add_memory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="peak step memory by category, every method, vs full fine-tuning")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=None,
                   help="comma-separated subset (default: every registered method)")
    p.add_argument("--backbone", default="llama-7b", help="large model, estimated (default llama-7b)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--paper-backbone", default="t5-base", help="the LST paper's setting; '' to skip")
    p.add_argument("--paper-batch-size", type=int, default=100)
    p.add_argument("--paper-seq-len", type=int, default=128)
    p.add_argument("--check-backbone", default="minilm-l6",
                   help="small model run for real (tracked) and estimated; '' to skip")
    p.add_argument("--check-batch-size", type=int, default=8)
    p.add_argument("--check-seq-len", type=int, default=64)


def cmd_memory(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    methods = _methods(args.methods)
    out: dict[str, Any] = {}
    log(f"estimating {args.backbone} ({args.dtype}, batch {args.batch_size} x {args.seq_len}) ...")
    out["large"] = {"backbone": args.backbone, "dtype": args.dtype, "batch_size": args.batch_size,
                    "seq_len": args.seq_len, "optimizer": "AdamW foreach (CUDA default)",
                    "rows": estimated_rows(args.backbone, args.dtype, args.batch_size, args.seq_len, methods,
                                           foreach=True)}
    if args.paper_backbone:
        log(f"estimating {args.paper_backbone} (fp32, batch {args.paper_batch_size} x {args.paper_seq_len}) ...")
        out["paper_like"] = {"backbone": args.paper_backbone, "dtype": "fp32", "batch_size": args.paper_batch_size,
                             "seq_len": args.paper_seq_len, "optimizer": "AdamW foreach (CUDA default)",
                             "rows": estimated_rows(args.paper_backbone, "fp32", args.paper_batch_size,
                                                    args.paper_seq_len, methods, foreach=True,
                                                    configs=PAPER_CONFIGS)}
    if args.check_backbone:
        log(f"tracking and estimating {args.check_backbone} (fp32, batch {args.check_batch_size} x "
            f"{args.check_seq_len}, random weights) ...")
        out["check"] = {"backbone": args.check_backbone, "dtype": "fp32", "batch_size": args.check_batch_size,
                        "seq_len": args.check_seq_len, "optimizer": "AdamW fused (the CPU trials' kernel)",
                        "rows": checked_rows(args.check_backbone, args.check_batch_size, args.check_seq_len, methods)}
    out["seconds"] = round(time.perf_counter() - started, 1)
    log(f"done in {out['seconds']:.0f}s")
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        recipe = "backbone in bf16, trainables fp32, autocast" if args.dtype == "bf16" else "fp32"
        _print_table(f"{args.backbone}, {recipe}, batch {args.batch_size} x {args.seq_len}, AdamW (foreach) "
                     "-- ESTIMATED on fake tensors", out["large"]["rows"], "estimated", GIB, "GiB")
        if "paper_like" in out:
            p = out["paper_like"]
            _print_table(f"{p['backbone']} (the LST paper's setting; LST keeps 9 of 12 blocks), fp32, batch "
                         f"{p['batch_size']} x {p['seq_len']} -- ESTIMATED", p["rows"], "estimated", GIB, "GiB")
            if p["backbone"] == "t5-base":
                _print_paper_gb(p["rows"])
        if "check" in out:
            c = out["check"]
            _print_check(f"{c['backbone']} (random weights), fp32, batch {c['batch_size']} x {c['seq_len']}, "
                         "AdamW fused -- TRACKED (real CPU step) vs ESTIMATED", c["rows"])
        print("\npaper: training-memory saving vs full fine-tuning claimed by the paper "
              "(READ -56%: READ paper, T5/GLUE; LST -69%, adapter/LoRA -26%: LST paper, T5-base fp32).")
    failed = [r["method"] for part in out.values() if isinstance(part, dict) for r in part["rows"] if "error" in r]
    return 1 if failed else 0


# --------------------------------------------------------------------------- cache

def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="a side-method sweep with and without the activation cache")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--task", default="vader-movies")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=["read", "lst"])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=1000, help="~25 min for read+lst on 2 cores")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-eval-examples", type=int, default=500)
    p.add_argument("--cache-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--side-only", type=lambda s: [m for m in s.split(",") if m], default=["read"],
                   help="methods whose sweep is also run on caches preloaded in memory (the floor)")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="one uncached LoRA trial")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def cmd_cache(args: argparse.Namespace) -> int:
    from study import bench_cache  # local: loads the training loop

    return bench_cache.run(args)


SUBCOMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "memory": (_add_memory, cmd_memory),
    "cache": (_add_cache, cmd_cache),
}


def check(args: argparse.Namespace) -> None:
    """Names and numbers, before any work: a ValueError naming the bad flag and the valid values."""
    from trainables import tasks
    from trainables.backbones import get_spec
    from trainables.methods import REGISTRY, get_method

    for flag in ("backbone", "paper_backbone", "check_backbone"):
        if getattr(args, flag, None):
            get_spec(getattr(args, flag))
    for method in args.methods or []:
        if not get_method(method).cacheable and args.command == "cache":
            raise ValueError(f"{method} reads no frozen taps, so it has no cache to bench; cacheable: "
                             f"{', '.join(m for m, i in REGISTRY.items() if i.cacheable)}")
    if getattr(args, "task", None) and not (args.task in tasks.TASK_NAMES or args.task.startswith("file:")):
        raise ValueError(f"unknown task {args.task!r}; valid: {', '.join(tasks.TASK_NAMES)}, or file:PATH")
    if getattr(args, "task", "").startswith("file:"):
        try:
            tasks.check_file(Path(args.task[5:]).expanduser())
        except OSError as exc:  # FileNotFoundError: one line like every other bad input
            raise ValueError(str(exc)) from None
    for key, value in vars(args).items():
        if isinstance(value, int) and not isinstance(value, bool) and key != "seed" and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be 1 or more, not {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in SUBCOMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        check(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
