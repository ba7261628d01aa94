"""`make gpu-check` (`python -m study.gpu_check`): what only a GPU can show, one command, under 5 minutes.

1. A small study on this GPU (`study.scaling` on local Ray): the BERT-family asset (minilm-l6) and the
   Llama asset (smollm2-135m), pretrained in bf16, with READ and LST — their activation caches built on
   this GPU by the cache builder, which measures their step there, so their rows say `cuda` — and LoRA
   and full fine-tuning, live. Every row must be ok, measured on cuda, with NVML energy.
2. Each row's measured step against the fake-tensor estimate of the same step as CUDA runs it
   (`memory.estimate_step(device_type="cuda")`: the cuBLAS workspaces, CUDA autocast's fp32 LayerNorm,
   softmax and loss): a table of the allocated and reserved peaks beside the estimate. An allocated peak
   more than 10% off its estimate fails.
3. A ZeRO-3 forward of a backbone with its parameters offloaded to the host (`trainables.zero`): the
   whole backbone's output, at a device peak below its weights.
4. The CUDA context a process holds, against the planner's assumption (`study.plan.CUDA_CONTEXT_BYTES`).

Without a GPU it prints "skipped: no GPU" and exits 0, except where an NVIDIA device is present and
torch has no CUDA (a CPU build on a GPU node): one error line, exit 1. Exit 1 when anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BACKBONES = ("minilm-l6", "smollm2-135m")  # the BERT-family and the Llama offline assets
METHODS = ("read", "lst", "lora", "full", "read@nf4", "lora@nf4")  # the last two: NF4 READ, QLoRA (issue 21)
TOLERANCE = 0.10
MIB = 2**20


def nvidia_present(dev: Path = Path("/dev/nvidia0"), smi: str | None = None) -> bool:
    """An NVIDIA GPU is on this machine, whatever torch says: its device node, or `nvidia-smi -L` lists one."""
    if dev.exists():
        return True
    smi = smi or shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


@dataclass(frozen=True)
class Measured:
    """One trial's measured step and its estimate (bytes)."""

    method: str
    backbone: str
    source: str | None
    allocated: int | None
    reserved: int | None
    estimate: int | None

    @property
    def off(self) -> float | None:
        """The measured (allocated) peak against the estimate: +0.05 is 5% above it."""
        if not self.allocated or not self.estimate:
            return None
        return self.allocated / self.estimate - 1

    def ok(self, tolerance: float = TOLERANCE) -> bool:
        return self.source == "cuda" and self.off is not None and abs(self.off) <= tolerance


def table(rows: Sequence[Measured], tolerance: float = TOLERANCE) -> tuple[list[str], bool]:
    """The cuda-against-estimate table, one line per trial, and whether every row is within `tolerance`."""
    def mib(v: int | None) -> str:
        return "-" if v is None else f"{v / MIB:.1f}"

    lines = [f"{'method':<8} {'backbone':<14} {'source':<9} {'allocated':>10} {'reserved':>10} {'estimate':>10} "
             f"{'off':>7}  (MiB)"]
    for r in rows:
        off = "-" if r.off is None else f"{r.off:+.1%}"
        why = ("ok" if r.ok(tolerance) else f"not measured on cuda ({r.source})" if r.source != "cuda"
               else "no estimate" if r.off is None else f"OFF BY MORE THAN {tolerance:.0%}")
        lines.append(f"{r.method:<8} {r.backbone:<14} {r.source or '-':<9} {mib(r.allocated):>10} "
                     f"{mib(r.reserved):>10} {mib(r.estimate):>10} {off:>7}  {why}")
    return lines, bool(rows) and all(r.ok(tolerance) for r in rows)


def _step_shape(row: dict[str, Any]) -> tuple[int, int, int]:
    """(batch, tokens, labels) of the step a trial measured: its first training batch, as `Trial.measure`
    draws it (the builder of a cached trial's cache draws the same)."""
    from trainables import tasks
    from trainables.backbones import get_spec
    from trainables.loop import RunConfig, epoch_seed
    from trainables.trial import load_data

    cfg = RunConfig(backbone=row["backbone"], method=row.get("method_base") or row["method"], task=row["task"],
                    train_size=int(row["train_size"]), max_length=int(row["max_length"]),
                    batch_size=int(row["batch_size"]), seed=int(row["seed"]))
    task, _ = load_data(cfg, get_spec(cfg.backbone))
    first = next(tasks.batches(task.train, cfg.batch_size, pad_token_id=task.pad_token_id, shuffle=True,
                               seed=epoch_seed(cfg.seed, 0)))
    b, t = first["input_ids"].shape
    return int(b), int(t), task.n_labels


def _estimate(backbone: str, method: str, method_config: dict | None, b: int, t: int, n_labels: int,
              cuda_major: int, settings: dict[str, Any]) -> int:
    """The fake-tensor estimate of the step as CUDA runs it (a worker process: CPU only); `settings`: the row's
    dtype, quant, quant_double and gradient_checkpointing."""
    from trainables.memory import estimate_step

    torch.set_num_threads(1)
    dtype = torch.float32 if settings.get("dtype") == "fp32" else torch.bfloat16
    return estimate_step(backbone, method, method_config, batch_size=b, seq_len=t, dtype=dtype, n_labels=n_labels,
                         device_type="cuda", cuda_major=cuda_major, quant=settings.get("quant") or "none",
                         quant_double=bool(settings.get("quant_double")),
                         gradient_checkpointing=bool(settings.get("gradient_checkpointing"))).peak_bytes


def run_study(folder: Path, args: argparse.Namespace) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "study.scaling", "--backbones", *args.backbones, "--max-model", args.backbones[-1],
           "--methods", *args.methods, "--task", "vader-movies", "--trials-per-method", "1", "--epochs", "1",
           "--train-size", str(args.train_size), "--batch-size", str(args.batch_size), "--max-length",
           str(args.max_length), "--cost-runs", "none", "--confirm-seeds", "0", "--no-memory-estimates",
           "--name", "gpu-check", "--storage", str(folder)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=args.study_timeout,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def study_rows(folder: Path, say: Callable[[str], None]) -> tuple[list[dict[str, Any]], bool]:
    """The study's trial rows, and whether each ran ok with NVML energy (and READ/LST from their cache)."""
    import pandas as pd

    rows = pd.read_parquet(folder / "gpu-check" / "trials.parquet").query("status != 'estimated'").to_dict("records")
    ok = bool(rows)
    for r in rows:
        base = r.get("method_base") or r["method"]
        problems = [f"status {r['status']}: {r.get('error')}"] if r["status"] != "ok" else []
        if r.get("energy_source") != "nvml" or not (r.get("energy_joules") or 0) > 0:
            problems.append(f"energy {r.get('energy_joules')} ({r.get('energy_source')}), not NVML")
        if base in ("read", "lst") and not r.get("cache_hit"):
            problems.append(f"no cache read ({r.get('cache_reason')})")
        ok &= not problems
        say(f"{r['method']} on {r['backbone']}: {r['status']}, {r.get('dtype')}, best {r.get('best_metric')}, energy "
            f"{r.get('energy_joules') or 0:.1f} J ({r.get('energy_source')}), {r.get('tokens_per_s') or 0:.0f} tokens/s, "
            f"cache: {r.get('cache_reason')}" + (f"  FAILED: {'; '.join(problems)}" if problems else ""))
    return rows, ok


def compare(rows: list[dict[str, Any]], workers: int) -> list[Measured]:
    """Each row's measured step beside its estimate, the estimates computed in parallel (fake tensors, CPU)."""
    major = torch.cuda.get_device_capability()[0]
    jobs = []
    for r in rows:
        b, t, n_labels = _step_shape(r)
        config = json.loads(r["method_config"]) if r.get("method_config") else None
        settings = {k: r.get(k) for k in ("dtype", "quant", "quant_double", "gradient_checkpointing")}
        jobs.append((r["backbone"], r.get("method_base") or r["method"], config, b, t, n_labels, major, settings))
    import multiprocessing

    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_estimate, *job) for job in jobs]
        estimates = []
        for f in futures:
            try:
                estimates.append(f.result())
            except Exception as exc:  # one row without an estimate fails that row, not the check
                print(f"estimate failed: {type(exc).__name__}: {exc}")
                estimates.append(None)
    return [Measured(r["method"], r["backbone"], r.get("memory_source"), r.get("peak_memory_bytes"),
                     r.get("peak_memory_reserved_bytes"), e) for r, e in zip(rows, estimates, strict=True)]


def zero_forward(backbone: str) -> tuple[str, bool]:
    """A ZeRO-3 forward with the parameters offloaded to the host against the whole backbone's on the GPU."""
    from trainables import backbones, zero

    spec, dtype, cuda = backbones.get_spec(backbone), torch.bfloat16, torch.device("cuda")
    ids = torch.randint(3, spec.config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    whole = backbones.load_pretrained(spec, dtype, cuda, backbones.source(spec))
    with torch.no_grad():
        ref = whole(input_ids=ids.to(cuda)).last_hidden_state.float().cpu()
    del whole
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    part = zero.build_partitioned(spec, weights="pretrained", dtype=dtype, ds_config=zero.config("cpu", dtype))
    try:
        with torch.no_grad():
            out = part.module(input_ids=ids.to(zero.input_device(part.module))).last_hidden_state.float().cpu()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        part.close()
    err = float((out - ref).abs().max() / ref.abs().max())
    weights = zero.weight_bytes(spec, dtype)
    ok = err < 0.02 and peak < weights
    return (f"zero-3 offloaded forward of {backbone}: relative difference {err:.2e} to the whole backbone's, device "
            f"peak {peak / MIB:.1f} MiB against {weights / MIB:.1f} MiB of weights: {'ok' if ok else 'FAILED'}"), ok


def context_line() -> tuple[str, int]:
    """The CUDA context this process holds (device total − free − what torch's allocator reserved)."""
    from study.plan import CUDA_CONTEXT_BYTES

    torch.empty(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    note = "within" if context <= CUDA_CONTEXT_BYTES else "ABOVE"
    return (f"cuda context: {context / MIB:.0f} MiB of {total / 2**30:.2f} GiB ({note} the planner's "
            f"{CUDA_CONTEXT_BYTES / MIB:.0f} MiB; other processes on this GPU count too)"), context


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--study-timeout", type=int, default=200, help="seconds the study may take")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the estimates")
    p.add_argument("--keep", type=Path, default=None, help="keep the study here (default: a temporary folder)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        if nvidia_present():
            print(f"error: an NVIDIA GPU is on this machine but torch {torch.__version__} has no CUDA "
                  f"(torch.version.cuda is {torch.version.cuda}): install a CUDA build of torch (study/setup.sh)")
            return 1
        print("skipped: no GPU (torch.cuda.is_available() is False)")
        return 0
    start = time.perf_counter()
    print(f"gpu: {torch.cuda.get_device_name(0)} (compute capability {torch.cuda.get_device_capability()}), "
          f"backbones {' '.join(args.backbones)}, methods {' '.join(args.methods)}, batch {args.batch_size} × "
          f"≤{args.max_length} tokens")
    line, _ = context_line()
    print(line)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        try:
            done = run_study(folder, args)
        except subprocess.TimeoutExpired:
            print(f"study: FAILED (more than {args.study_timeout} s)")
            return 1
        if done.returncode != 0 or not (folder / "gpu-check" / "trials.parquet").exists():
            print(f"study: FAILED (exit {done.returncode})\n{done.stderr[-3000:]}")
            return 1
        print(f"study: {time.perf_counter() - start:.0f} s")
        rows, ok = study_rows(folder, print)
    measured = compare(rows, args.workers)
    lines, within = table(measured)
    print("\n".join(lines))
    ok &= within
    try:
        line, zero_ok = zero_forward(args.backbones[-1])
    except Exception as exc:  # reported, and the check fails
        line, zero_ok = f"zero-3 offloaded forward: FAILED ({type(exc).__name__}: {exc})", False
    print(line)
    ok &= zero_ok
    print(f"gpu-check: {'ok' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
