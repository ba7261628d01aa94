"""`python -m study.convergence`: epochs-to-converge vs training-set size, per method.

Methods × training-set sizes × seeds on a pretrained backbone, each at its reference
learning rate (METHODS.md) with a fixed, generous epoch budget and no early stopping,
recording the validation metric every epoch. The analysis compares epochs-to-target
(first epoch reaching a fraction of the trial's best) paired by size and seed.
"""

from __future__ import annotations

import argparse
import time

from study import collect, plan, runner
from study.collect import summary_table
from study.launch import Group
from trainables.backbones import get_spec, load_tokenizer


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m study.convergence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 512], help="training-set sizes")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="3+ seeds: the analysis needs 3 pairs")
    p.add_argument("--epochs", type=int, default=6, help="fixed epoch budget (no early stopping)")
    p.add_argument("--max-eval-examples", type=int, default=500, help="500: one example is 0.2 points")
    p.add_argument("--quick", action="store_true", help="a ~2 minute smoke study")
    runner.add_common_args(p, name="convergence")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.quick:
        args.sizes, args.seeds, args.epochs, args.max_eval_examples = [64, 256], [0], 3, 200
    methods = args.methods or ["read", "lora", "adapter", "full"]
    runner.check_input(methods, [args.backbone], args)
    if min(args.sizes) < 2 or args.epochs < 1 or args.max_eval_examples < 1:
        raise runner.UsageError("--sizes must be >= 2, --epochs and --max-eval-examples >= 1")
    if min(args.seeds) < 0:
        raise runner.UsageError(f"--seeds must be 0 or more, not {min(args.seeds)}")
    try:  # a real task needs the tokenizer: on this machine, or fetched now (small) before anything runs
        load_tokenizer(get_spec(args.backbone))
    except ValueError as exc:
        raise runner.UsageError(f"no tokenizer for {args.backbone} ({exc}); convergence needs a real task "
                                f"(try minilm-l6 or smollm2-135m)") from None
    name = args.name if args.name != "convergence" or not args.quick else "convergence-quick"
    max_length = args.max_length or 32

    t0 = time.time()
    budget = plan.Budget.detect(gpu_memory_gib=args.gpu_memory_gib)
    resources = {"cpu": budget.cpus_per_trial, **({"gpu": budget.gpus_per_trial} if budget.gpus_per_trial else {})}
    groups = [
        Group(name=f"{m}|{args.backbone}|n{n}|s{seed}", space={}, n_trials=1, resources=resources,
              run={"backbone": args.backbone, "method": m, "task": args.task, "text_col": args.text_col,
                   "label_col": args.label_col, "train_size": n, "seed": seed, "epochs": args.epochs,
                   "max_length": max_length, "batch_size": args.batch_size,
                   "max_eval_examples": args.max_eval_examples})
        for n in args.sizes for seed in args.seeds for m in methods
    ]
    runner.check_runs([g.run for g in groups])
    folder = runner.study_dir(args.storage, name, args.resume)
    config = {"study": "convergence", "methods": methods, "backbone": args.backbone, "sizes": args.sizes,
              "seeds": args.seeds, "epochs": args.epochs, "task": args.task, "text_col": args.text_col,
              "label_col": args.label_col, "max_length": max_length, "batch_size": args.batch_size,
              "max_eval_examples": args.max_eval_examples, "seed": args.seed}
    runner.check_resume(name, folder, config, args.resume)
    plan_info = {"study": name, "config": config, "methods": methods, "backbone": args.backbone, "sizes": args.sizes,
                 "seeds": args.seeds, "epochs": args.epochs}
    trials, epochs = runner.execute(name, folder, groups, [], plan_info=plan_info, resume=args.resume,
                                    address=args.address, seed=args.seed, early_stopping=False,
                                    zero_ranks=args.zero_ranks)
    trials = collect.with_cache_shares(trials)  # cached trials carry their share of the cache builds
    collect.write(folder, trials, epochs)
    print(summary_table(trials))
    print(f"\nwall time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    raise SystemExit(runner.main_guard(main))
