"""Parameter counts of method × backbone on the meta device: `python -m study.count`.

Nothing is allocated, so any size (llama-70b) counts in well under a second. `count()` is
the reusable part (memory estimates and study planning import it); the CLI only prints.

    python -m study.count --backbone llama-7b --method lora --set r=16 [--json]
    python -m study.count --backbone llama-7b --method lora@nf4+gc --memory   (QLoRA with checkpointing)
    python -m study.count --all [--max-model llama-7b] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from typing import Any, NoReturn

import torch

from trainables import backbones
from trainables.methods import REGISTRY, apply_method, get_method
from trainables.methods.base import config_to_dict

# A method config training more parameters than this is a typo, not a study (16 TB of fp32 AdamW state).
MAX_TRAINABLE_PARAMS = 10**12
KEYS = ("backbone", "method", "method_base", "quant", "gradient_checkpointing", "family", "config", "params_backbone", "params_total", "params_trainable",
        "params_head", "trainable_fraction", "grad_tensors", "grad_tensor_kinds")


def count(backbone: str, method: str, overrides: dict[str, Any] | None = None, n_labels: int = 2) -> dict[str, Any]:
    """Counts for one pair (keys: KEYS). `params_trainable` excludes the head; the fraction is of the bare backbone.

    `grad_tensor_kinds` summarises the backbone tensors that receive gradients: block indices
    become `*`, so Llama-7B's 64 LoRA matrices read as four names with counts.
    """
    spec = backbones.get_spec(backbone)
    info = get_method(method)
    cfg = info.parse(overrides)
    bb = backbones.build(spec, "meta")
    params_backbone = backbones.count_params(bb)
    try:
        model = apply_method(method, bb, spec, cfg, n_labels=n_labels)
    except RuntimeError as exc:  # e.g. torch: "Storage size calculation overflowed" for an absurd width
        raise ValueError(f"{method} {config_to_dict(cfg)} cannot be built on {spec.name}: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    counts = model.param_counts()
    if counts["params_trainable"] > MAX_TRAINABLE_PARAMS:
        raise ValueError(f"{method} {config_to_dict(cfg)} on {spec.name} trains {counts['params_trainable']:.3g} "
                         f"parameters, more than {MAX_TRAINABLE_PARAMS:.0e} (16 bytes each with AdamW: no machine "
                         "holds them); check the --set values")
    grads = model.backbone_tensors_with_grad()
    # `method` is a registry name here; the CLI takes a spec (lora@nf4+gc) and fills in its label and parts
    return {"backbone": spec.name, "method": method, "method_base": method, "quant": "none",
            "gradient_checkpointing": False, "family": info.family, "config": config_to_dict(cfg),
            "params_backbone": params_backbone, **counts,
            "trainable_fraction": counts["params_trainable"] / params_backbone,
            "grad_tensors": len(grads), "grad_tensor_kinds": dict(Counter(re.sub(r"\.\d+\.", ".*.", n) for n in grads))}


def backbones_by_size(max_model: str | None = None) -> list[tuple[str, int]]:
    """Registered backbones (no `@` variants) with their parameter counts, smallest first, up to `max_model`."""
    sizes = sorted(((n, backbones.count_params(backbones.build(n, "meta"))) for n in backbones.names() if "@" not in n),
                   key=lambda x: x[1])
    if max_model is None:
        return sizes
    names = [n for n, _ in sizes]
    if max_model not in names:
        raise ValueError(f"unknown --max-model {max_model!r}; valid: {', '.join(names)}")
    return sizes[: names.index(max_model) + 1]


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _pct(f: float) -> str:
    return f"{f:.2%}" if f >= 1e-3 else f"{100 * f:.2g}%"


def _print_one(r: dict[str, Any]) -> None:
    cfg = " ".join(f"{k}={v}" for k, v in r["config"].items()) or "(defaults)"
    print(f"{r['backbone']} + {r['method']} ({r['family']}): {cfg}")
    for key in ("params_backbone", "params_total", "params_trainable", "params_head"):
        print(f"  {key:<17} {r[key]:>15,}")
    print(f"  {'trainable/backbone':<17} {r['trainable_fraction']:>15.4%}")
    print(f"  backbone tensors with grad: {r['grad_tensors']}")
    for kind, n in r["grad_tensor_kinds"].items():
        print(f"    {n:>5} × {kind}")
    if "peak_memory_bytes" in r:
        print(f"  peak training memory, {r['memory_source']} (one AdamW step, batch {r['memory_batch_size']} × "
              f"{r['memory_seq_len']} tokens, {r['memory_dtype']}):")
        for key in ("peak_memory_bytes", "memory_params_bytes", "memory_grads_bytes", "memory_optimizer_bytes",
                    "memory_activations_bytes"):
            print(f"    {key.removeprefix('memory_').removesuffix('_bytes'):<17} {r[key] / 2**30:>10.2f} GiB")


def _table(max_model: str | None, methods: list[str], overrides: dict[str, Any], as_json: bool) -> None:
    rows, errors = [], []
    for name, size in backbones_by_size(max_model):
        cells = []
        for m in methods:
            try:
                cells.append(count(name, m, overrides))
            except ValueError as exc:  # one impossible pair (e.g. a width constraint) should not hide the rest
                cells.append(None)
                errors.append(f"{name} + {m}: {exc}")
        rows.append((name, size, cells))
    if as_json:
        print(json.dumps([c for _, _, cells in rows for c in cells if c is not None], indent=1))
    else:
        print(f"{'backbone':<15} {'params':>7}  " + "  ".join(f"{m:>13}" for m in methods))
        for name, size, cells in rows:
            shown = ["error" if c is None else f"{_human(c['params_trainable'])} {_pct(c['trainable_fraction'])}"
                     for c in cells]
            print(f"{name:<15} {_human(size):>7}  " + "  ".join(f"{s:>13}" for s in shown))
        print("cells: trainable parameters (head excluded), and as a fraction of the backbone")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m study.count", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="registered backbone name (NAME@L<k> truncates)")
    parser.add_argument("--method", help=f"NAME[@QUANT][+gc] (lora, lora+gc, lora@nf4, read@int8); NAME one of: "
                                         f"{', '.join(REGISTRY)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config override")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--all", action="store_true", help="table of every method (or --method) × backbone")
    parser.add_argument("--max-model", help="with --all: stop after this backbone (backbones ordered by size)")
    parser.add_argument("--memory", action="store_true",
                        help="also estimate peak training memory of one step (fake tensors, no weights)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        overrides = dict(_split(kv) for kv in args.set)
        if args.all:
            if overrides and not args.method:
                raise ValueError("--set with --all needs --method (config keys belong to one method)")
            if args.method:
                get_method(args.method).parse(overrides)  # bad names and keys fail once, not in every cell
            _table(args.max_model, [args.method] if args.method else list(REGISTRY), overrides, args.json)
            if not args.json:
                print(f"({time.perf_counter() - start:.2f} s)")
            return 0
        if not (args.backbone and args.method):
            raise ValueError("give --backbone and --method, or --all")
        from study.spaces import method_label, parse_method_spec

        name, quant, gc = parse_method_spec(args.method)  # a quantised backbone counts as many parameters
        result = count(args.backbone, name, overrides) | {"method": method_label(name, quant, gc), "method_base": name,
                                                          "quant": quant, "gradient_checkpointing": gc}
        if args.memory:
            if min(args.batch_size, args.seq_len) < 1:
                raise ValueError("--batch-size and --seq-len must be >= 1")
            positions = backbones.get_spec(args.backbone).config.get("max_position_embeddings")
            tokens = args.seq_len + getattr(get_method(name).parse(overrides), "n_virtual_tokens", 0)
            if positions is not None and tokens > positions:
                raise ValueError(f"{tokens} tokens per example (--seq-len plus any virtual tokens) exceed "
                                 f"{args.backbone}'s {positions} positions")
            from trainables.memory import estimate_step  # fake-tensor machinery: only when asked

            try:
                extra = {"quant": quant, "gradient_checkpointing": gc} if quant != "none" or gc else {}
                report = estimate_step(args.backbone, name, overrides, batch_size=args.batch_size,
                                       seq_len=args.seq_len, dtype=DTYPES[args.dtype], **extra)
            except RuntimeError as exc:  # e.g. more tokens than the backbone has positions
                raise ValueError(f"memory estimate failed: {' '.join(str(exc).split())[:300]}") from None
            result |= report.as_dict() | {"memory_batch_size": args.batch_size, "memory_seq_len": args.seq_len,
                                          "memory_dtype": args.dtype}
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_one(result)
    return 0


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _split(kv: str) -> tuple[str, str]:
    key, sep, value = kv.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {kv!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


if __name__ == "__main__":
    sys.exit(main())
