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

`memory-quant`: quantised frozen backbones and gradient checkpointing (issue 21):
1. estimate vs tracked for NF4 and int8 SmolLM2-135M (a real CPU step through bitsandbytes);
2. the comparison table: MiniLM-L6 tracked (a real CPU step, fp32; time per step measured) and
   Llama-7B / Llama-70B estimated (bf16; FLOPs per step), for the side methods, the probe, LoRA,
   LoRA+gc, QLoRA, QLoRA+gc and full+gc, each unquantised and in NF4 where it applies;
3. the "Ladder Up, Memory Down" setting (arXiv 2512.14237): Llama-7B, 2k context, batch 1 (the
   abstract gives no batch size: an assumption), LST vs QLoRA on the estimate.
The large models are estimated on truncated copies (NAME@L2, NAME@L4) and extrapolated linearly in
depth (every term of a step — weights, saved activations, side blocks — grows by the same amount a
block; checked against a whole-model estimate of Llama-7B, printed): a whole 70B fake-tensor step
takes minutes per method on 2 cores.

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
        peaks = {k: row[k]["peak_bytes"] for k in ("tracked", "estimated") if k in row}
        log(f"  [{i}/{len(methods)}] {backbone} {method}: {what} in {row['seconds']:.1f}s"
            + (f"  FAILED {row['error']}" if "error" in row else "")
            + "".join(f"  {k} {v / MIB:.1f} MiB" for k, v in peaks.items())
            + (f"  {row['step_s']:.3f} s/step" if "step_s" in row else "")
            + (f"  {row['flops_per_step'] / 1e12:.3f} TFLOP" if "flops_per_step" in row else ""))
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


# --------------------------------------------------------------------------- memory-quant

# the closing note's rows (issue 21): labels as in trials.parquet (study.spaces)
QUANT_TABLE = ("read", "read@nf4", "lst", "lst@nf4", "sherl", "sherl@nf4", "probe", "probe@nf4", "lora", "lora+gc",
               "lora@nf4", "lora@nf4+gc", "full", "full+gc")
LADDER_UP = ("lst@nf4", "lora@nf4", "lora@nf4+gc", "read@nf4", "lst", "lora", "lora+gc")


def _add_memory_quant(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory-quant", help="NF4 / int8 backbones and gradient checkpointing: estimate vs tracked, "
                                            "and the side methods against LoRA(+gc), QLoRA(+gc), full+gc")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=None,
                   help=f"comma-separated labels (default: {','.join(QUANT_TABLE)})")
    p.add_argument("--check-backbone", default="smollm2-135m", help="quantised for real, tracked vs estimated")
    p.add_argument("--tracked-backbone", default="minilm-l6", help="the table's tracked backbone; '' to skip")
    p.add_argument("--large", type=lambda s: [b for b in s.split(",") if b], default=["llama-7b", "llama-70b"],
                   help="estimated backbones (extrapolated in depth); '' to skip")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32, help="the default study's max_length")
    p.add_argument("--ladder-up", action=argparse.BooleanOptionalAction, default=True,
                   help="the Ladder Up, Memory Down row: llama-7b, batch 1 x 2048, bf16")
    p.add_argument("--steps", type=int, default=3, help="timed real steps per tracked row (after one warm-up)")


def _spec_of(label: str) -> tuple[str, dict[str, Any]]:
    from study.spaces import parse_method_spec

    name, quant, gc = parse_method_spec(label)
    return name, {"quant": quant, "gradient_checkpointing": gc}


def tracked_row(backbone: str, label: str, batch_size: int, seq_len: int, steps: int = 3,
                estimate: bool = True) -> dict[str, Any]:
    """A real CPU step (random weights, fp32, the label's quantisation and checkpointing): tracked peak by
    category, the median wall time of `steps` steps, and the fake-tensor estimate beside it."""
    from trainables.backbones import get_spec
    from trainables.memory import adamw, build_task_model, estimate_step, measure_step, synthetic_batch

    name, kw = _spec_of(label)
    spec = get_spec(backbone)
    torch.manual_seed(0)
    model = build_task_model(backbone, name, None, device="cpu", dtype=torch.float32, **kw)
    batch = synthetic_batch(spec.config["vocab_size"], batch_size, seq_len,
                            pad_token_id=spec.config.get("pad_token_id") or 0)
    tracked = measure_step(model, batch)
    model.train()
    optimizer, times = adamw([p for p in model.parameters() if p.requires_grad], 1e-4), []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    del model, optimizer
    row = {"tracked": _report_dict(tracked), "step_s": sorted(times[1:])[len(times[1:]) // 2]}
    if estimate:
        est = estimate_step(backbone, name, None, batch_size=batch_size, seq_len=seq_len, dtype=torch.float32,
                            foreach=None, **kw)
        row |= {"estimated": _report_dict(est), "error_vs_tracked": est.peak_bytes / tracked.peak_bytes - 1}
    return row


def extrapolated_row(backbone: str, label: str, batch_size: int, seq_len: int, dtype: str = "bf16",
                     depths: tuple[int, int] = (2, 4)) -> dict[str, Any]:
    """The estimate of a deep backbone from two truncated copies: peak (and each category, and FLOPs) a + b·L."""
    from trainables.backbones import get_spec
    from trainables.memory import estimate_step

    name, kw = _spec_of(label)
    layers = get_spec(backbone).n_layers
    reports = [estimate_step(f"{backbone}@L{d}", name, None, batch_size=batch_size, seq_len=seq_len,
                             dtype=DTYPES[dtype], count_flops=True, **kw) for d in depths]
    (d0, r0), (d1, r1) = zip(depths, reports, strict=True)

    def line(a: float, b: float) -> int:
        return int(round(a + (b - a) / (d1 - d0) * (layers - d0)))

    est = {k: line(getattr(r0, k), getattr(r1, k)) for k in ("peak_bytes", *CATEGORIES)}
    return {"estimated": {**est, "source": f"estimated (L{d0}, L{d1} -> L{layers})"},
            "flops_per_step": line(r0.flops, r1.flops)}


def cmd_memory_quant(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    labels = args.methods or list(QUANT_TABLE)
    out: dict[str, Any] = {"batch_size": args.batch_size, "seq_len": args.seq_len}
    if args.check_backbone:
        log(f"{args.check_backbone}: NF4 / int8, tracked vs estimated (fp32 compute, batch 4 x 32) ...")
        checks = [f"{m}@{q}" for q in ("nf4", "int8") for m in ("read", "lora")] + ["lora+gc", "lora@nf4+gc"]
        out["check"] = _per_method(checks, "tracked + estimated", args.check_backbone,
                                   lambda m: tracked_row(args.check_backbone, m, 4, 32, steps=1))
    if args.tracked_backbone:
        log(f"{args.tracked_backbone}: tracked, fp32, batch {args.batch_size} x {args.seq_len} ...")
        out["tracked"] = _per_method(labels, "tracked", args.tracked_backbone,
                                     lambda m: tracked_row(args.tracked_backbone, m, args.batch_size, args.seq_len,
                                                           steps=args.steps, estimate=False))
    for backbone in args.large:
        log(f"{backbone}: estimated, bf16, batch {args.batch_size} x {args.seq_len} (extrapolated from 2 and 4 blocks)")
        out[backbone] = _per_method(labels, "estimated", backbone,
                                    lambda m, b=backbone: extrapolated_row(b, m, args.batch_size, args.seq_len))
    if args.ladder_up:
        log("Ladder Up, Memory Down: llama-7b, bf16, batch 1 x 2048 ...")
        out["ladder_up"] = _per_method(list(LADDER_UP), "estimated", "llama-7b",
                                       lambda m: extrapolated_row("llama-7b", m, 1, 2048))
    out["seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    if "check" in out:
        print(f"\n{args.check_backbone} (random weights, quantised by bitsandbytes on CPU), batch 4 x 32 -- "
              "TRACKED vs ESTIMATED (MiB)")
        for r in out["check"]:
            if "error" in r:
                print(f"  {r['method']:<12} FAILED: {r['error'][:120]}")
                continue
            print(f"  {r['method']:<12} tracked {r['tracked']['peak_bytes'] / MIB:8.1f}  estimated "
                  f"{r['estimated']['peak_bytes'] / MIB:8.1f}  error {r['error_vs_tracked']:+.2%}")
    _print_quant_table(out, labels, args)
    if "ladder_up" in out:
        rows = {r["method"]: r for r in out["ladder_up"] if "error" not in r}
        print("\nLadder Up, Memory Down (arXiv 2512.14237) setting: llama-7b, bf16 compute, batch 1 (assumed) x 2048, "
              "no checkpointing unless +gc -- ESTIMATED (GiB)")
        for m, r in rows.items():
            vs = rows.get("lora@nf4")
            rel = f"  vs QLoRA {r['estimated']['peak_bytes'] / vs['estimated']['peak_bytes'] - 1:+.0%}" if vs else ""
            fits = "fits" if r["estimated"]["peak_bytes"] <= 12e9 else "does not fit"
            print(f"  {m:<12} {r['estimated']['peak_bytes'] / GIB:7.2f}{rel}  ({fits} a 12 GB GPU)")
        print("  paper: LST -50% peak vs QLoRA; 7B on a 12 GB GPU at 2k context without checkpointing, "
              "where QLoRA runs out of memory")
    log(f"done in {out['seconds']:.0f}s")
    failed = [r["method"] for v in out.values() if isinstance(v, list) for r in v if "error" in r]
    return 1 if failed else 0


def _print_quant_table(out: dict[str, Any], labels: list[str], args: argparse.Namespace) -> None:
    from study.spaces import method_label

    cols = [k for k in ("tracked", *args.large) if k in out]
    if not cols:
        return
    by = {c: {r["method"]: r for r in out[c]} for c in cols}
    head = "  ".join(f"{(c if c != 'tracked' else args.tracked_backbone + ' tracked'):>30}" for c in cols)
    print(f"\npeak memory and cost per step, batch {args.batch_size} x {args.seq_len}: {args.tracked_backbone} "
          "TRACKED (fp32, real CPU step: MiB, s/step); large models ESTIMATED (bf16 compute: GiB, TFLOPs/step)")
    print(f"  {'method':<12} {head}")
    for m in labels:
        cells = []
        for c in cols:
            r = by[c].get(m, {})
            if "error" in r or not r:
                cells.append(f"{'FAILED' if r else '-':>30}")
            elif c == "tracked":
                cells.append(f"{r['tracked']['peak_bytes'] / MIB:12.1f} MiB {r['step_s']:9.3f} s/step")
            else:  # bitsandbytes' 4/8-bit matmuls have no FLOP formula: a quantised row shows its twin's (*)
                name, kw = _spec_of(m)
                twin = by[c].get(method_label(name, "none", kw["gradient_checkpointing"]), {})
                flops, star = ((twin["flops_per_step"], "*") if kw["quant"] != "none" and "flops_per_step" in twin
                               else (r["flops_per_step"], " "))
                cells.append(f"{r['estimated']['peak_bytes'] / GIB:12.2f} GiB {flops / 1e12:7.2f}{star} TFLOP")
        print(f"  {m:<12} {'  '.join(cells)}")
    print("  *: the unquantised twin's FLOPs (the dequantised matmuls compute the same products)")
    failed = [f"{c} {r['method']}: {r['error'][:150]}" for c in cols for r in out[c] if "error" in r]
    for f in failed:
        print(f"  FAILED {f}")


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
    "memory-quant": (_add_memory_quant, cmd_memory_quant),
    "cache": (_add_cache, cmd_cache),
}


def check(args: argparse.Namespace) -> None:
    """Names and numbers, before any work: a ValueError naming the bad flag and the valid values."""
    from trainables import tasks
    from trainables.backbones import get_spec
    from trainables.methods import REGISTRY, get_method

    for flag in ("backbone", "paper_backbone", "check_backbone", "tracked_backbone"):
        if getattr(args, flag, None):
            get_spec(getattr(args, flag))
    for b in getattr(args, "large", None) or []:
        get_spec(b)
    if args.command == "memory-quant":
        from study.spaces import parse_method_spec

        for label in args.methods or []:
            parse_method_spec(label)
        return
    for method in args.methods or []:
        if not get_method(method).cacheable and args.command == "cache":
            raise ValueError(f"{method} reads no frozen taps, so it has no cache to bench; cacheable: "
                             f"{', '.join(m for m, i in REGISTRY.items() if i.cacheable)}")
    if getattr(args, "task", None) and not tasks.is_task_name(args.task):
        raise ValueError(f"unknown task {args.task!r}; valid: {', '.join(tasks.TASK_NAMES)}, file:PATH, "
                         "or hf:ORG/NAME[:CONFIG][@REVISION]")
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
