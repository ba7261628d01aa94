"""`python -m study.scaling`: methods × the backbone ladder, searched and run on Ray Tune.

Plans first (meta-device counts for every pair; fake-tensor memory estimates for every pair on
GPUs, and on CPU for the pairs that run and the ladder's top, --estimate-ladder for all), then
runs what fits this machine and records the rest as `estimated` rows. With no flags it runs the
embedded default: pretrained MiniLM-L6 for quality (fewer backbones rather than thin
budgets), a random Llama for cost (memory, throughput; one short epoch — its accuracy means
nothing), vader-movies, and the methods the study's claims are about: the linear probe (the
floor), READ, LST, SHERL, LoRA, QLoRA (lora@nf4) and full fine-tuning, and the memory baselines
LoRA, QLoRA and full fine-tuning with gradient checkpointing (+gc: one short cost run each, as
checkpointing recomputes the same function; the other methods with --methods, each entry
NAME[@QUANT][+gc]; --quant and --gradient-checkpointing apply study-wide). Every method gets the same budget:
8 trials of 160 optimisation steps (Optuna TPE after a short random start, ASHA within each
method, selected on 500 validation examples: one example = 0.2 points), then each method's
winner (best final-epoch validation score among full-budget trials) re-run with 3 fresh seeds
(study.confirm) and scored on the held-out test split; quality is the seeds' mean test score with
a Student-t 95% CI (quality.parquet), and the linear probe is the floor.

On a GPU budget (a local GPU, or --gpu-memory-gib G from a CPU head) the ladder is every
registered checkpoint up to --max-model, and every pair whose estimated step fits runs
pretrained in bf16 (side methods of a backbone too big for one GPU with ZeRO-3); the rest
are estimated rows with the reason. --dry-run prints that plan (--json for machines) and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

from study import confirm, launch, plan, progress, runner, spaces, trackers
from study.collect import summary_table
from study.launch import Group
from trainables import backbones

DEPTH_LADDER = ("smollm2-135m@L2", "smollm2-135m@L4", "smollm2-135m@L8", "smollm2-135m@L16")


@dataclass(frozen=True)
class Settings:
    """How the pairs that run are trained (pretrained backbones; random ones get `cost_*`)."""

    trials_per_method: int = 8  # the same for every method
    epochs: int = 4  # 4 × 640 / 16 = 160 optimisation steps: enough to leave a random side path's init
    train_size: int = 640
    max_length: int = 32
    max_eval_examples: int = 500  # one example is 0.2 points of accuracy
    confirm_seeds: int = 3  # the best configuration of each method re-run with this many fresh seeds
    cost_epochs: int = 1
    cost_batches: int = 6


DEFAULT = Settings()
QUICK = Settings(trials_per_method=1, epochs=1, train_size=128, max_eval_examples=200, confirm_seeds=2,
                 cost_batches=3)
DEFAULT_RUN_BACKBONES = ("minilm-l6", "llama-11m")
# the side methods against the field's memory baselines: LoRA with and without gradient checkpointing, QLoRA
# (LoRA on an NF4 backbone) with and without, full fine-tuning with and without. A +gc entry whose plain twin is
# in the study gets one short cost run (memory, time per step), not a search: checkpointing recomputes the same
# function, so its quality is its twin's (issue 21; ~+5 min, the QLoRA search, over the 22 min of 6 methods)
DEFAULT_METHODS = ("probe", "read", "lst", "sherl", "lora", "lora+gc", "lora@nf4", "lora@nf4+gc", "full", "full+gc")
QUICK_RUN_BACKBONES = ("minilm-l6",)
QUICK_METHODS = ("probe", "read", "lora", "full")


def twin(label: str) -> str:
    """A +gc label's plain twin (lora@nf4+gc -> lora@nf4): the same function, computed without checkpointing."""
    name, quant, _ = spaces.parse_method_spec(label)
    return spaces.method_label(name, quant, False)


def ladder(max_model: str, gpu: bool = False) -> list[str]:
    """Registered backbones up to max_model's size (any name, hub id or folder: counted on meta).

    CPU: all of them (tests excluded) plus the pretrained depth ladder. GPU: the registered
    checkpoints (the random cost ladder exists for CPUs), and max_model itself. Encoder–decoders
    form their own ladder: `--max-model t5-11b` (or flan-t5-xxl) plans the T5 sizes, any other
    max model the decoder/encoder-only ones.
    """
    top = backbones.count_params(backbones.build(max_model))
    t5 = backbones.get_spec(max_model).anatomy.encoder_decoder
    same_kind = [n for n, s in backbones.REGISTRY.items() if s.note != "tests" and s.anatomy.encoder_decoder == t5]
    if gpu:
        names = [n for n in same_kind if backbones.REGISTRY[n].has_checkpoint]
    else:
        names = same_kind + ([] if t5 else list(DEPTH_LADDER))
    sized = [(backbones.count_params(backbones.build(n)), n) for n in dict.fromkeys([*names, max_model])]
    return [n for size, n in sorted(sized) if size <= top]


def to_estimate(args: argparse.Namespace, gpu: bool, run_backbones: list[str], all_backbones: list[str]) -> list[str]:
    """The backbones whose pairs get memory estimates: all on GPUs (every pair may run: its estimate decides
    where), in a dry run (the plan is the point) and with --estimate-ladder; on CPU those that run and the top."""
    if args.no_memory_estimates:
        return []
    if gpu or args.dry_run or args.estimate_ladder:
        return all_backbones
    return list(dict.fromkeys([*run_backbones, args.max_model]))


def print_plan(pairs: list[plan.PairPlan], budget: plan.Budget, as_json: bool, run_backbones: list[str]) -> None:
    """The --dry-run output: every pair, where it runs with which weights and dtype, its peak, or why not."""
    pairs = [p if not p.runnable or p.backbone in run_backbones else
             dataclasses.replace(p, runnable=False, reason="fits, but not among the backbones run here "
                                                           "(add it to --backbones)") for p in pairs]
    if as_json:
        print(json.dumps({"budget": dataclasses.asdict(budget), "pairs": [p.as_dict() for p in pairs]}, indent=1))
        return
    print(f"budget: {budget.device}, {budget.memory_bytes / 2**30:.1f} GiB per trial")
    for p in pairs:
        print(p.line())
    n_zero = sum(p.zero for p in pairs)
    print(f"{sum(p.runnable for p in pairs)} of {len(pairs)} pairs run ({n_zero} with ZeRO-3), "
          f"{sum(not p.runnable for p in pairs)} estimated only")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m study.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-model", default="llama-7b",
                   help="largest backbone of the ladder (registry name, hf:ORG/NAME[@REV], or a folder)")
    p.add_argument("--backbones", nargs="+", metavar="B",
                   help="backbones to run: registry names, hf:ORG/NAME[@REV], folders (default: the embedded set "
                        "on CPU, the whole ladder on GPUs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (every pair: where, weights, dtype, "
                                                           "estimated peak, or why not) and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.add_argument("--trials-per-method", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--confirm-seeds", type=int, default=None, help="seeds the best configuration is re-run with "
                   "(default 3; 0: no confirm phase: every cell is then unconfirmed, with no test score or verdict)")
    p.add_argument("--quick", action="store_true", help="a ~2 minute smoke study")
    p.add_argument("--no-memory-estimates", action="store_true", help="skip the per-pair memory estimates")
    p.add_argument("--estimate-ladder", action="store_true",
                   help="estimate the memory of every ladder pair, also those that do not run here (always on GPUs "
                        "and with --dry-run; on CPU by default only the pairs that run and --max-model's: the "
                        "other rungs' fake-tensor steps take ~3 of a 2-core laptop's minutes)")
    p.add_argument("--cost-runs", choices=["random", "none"], default="random",
                   help="'random': random-weight backbones get one short cost run per method (memory, speed); "
                        "'none': train them like pretrained ones")
    runner.add_common_args(p, name="scaling")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    base = QUICK if args.quick else DEFAULT
    given = {k: getattr(args, k) for k in ("trials_per_method", "epochs", "train_size", "max_length", "confirm_seeds")
             if getattr(args, k) is not None}  # 0 is refused below, not replaced by the default
    s = dataclasses.replace(base, **given)
    methods = runner.method_labels(args, QUICK_METHODS if args.quick else DEFAULT_METHODS)  # labels: lora@nf4+gc
    runner.check_input(methods, (args.backbones or []) + [args.max_model], args)
    if min(s.trials_per_method, s.epochs, s.train_size) < 1:
        raise runner.UsageError("--trials-per-method, --epochs and --train-size must be >= 1")
    if s.confirm_seeds < 0:
        raise runner.UsageError(f"--confirm-seeds must be >= 0, not {s.confirm_seeds}")
    if args.json and not args.dry_run:
        raise runner.UsageError("--json goes with --dry-run")
    if args.estimate_ladder and args.no_memory_estimates:
        raise runner.UsageError("--estimate-ladder and --no-memory-estimates contradict each other; pass one")
    budget = plan.Budget.detect(gpu_memory_gib=args.gpu_memory_gib)
    gpu = budget.device == "cuda"
    planned = [args.max_model] if args.quick else ladder(args.max_model, gpu)  # quick: one anchor, not the ladder
    default_run = QUICK_RUN_BACKBONES if args.quick else (planned if gpu else DEFAULT_RUN_BACKBONES)
    run_backbones = args.backbones or list(default_run)
    name = args.name if args.name != "scaling" or not args.quick else "scaling-quick"
    config = {"study": "scaling", "methods": methods, "run_backbones": run_backbones, "max_model": args.max_model,
              "task": args.task, "text_col": args.text_col, "label_col": args.label_col, "settings": s.__dict__,
              "batch_size": args.batch_size, "seed": args.seed, "cost_runs": args.cost_runs}
    folder = None
    if not args.dry_run:  # a dry run loads no data and writes nothing
        runner.check_runs([{"backbone": b, **spaces.run_fields(m), "task": args.task, "text_col": args.text_col,
                            "label_col": args.label_col, "train_size": s.train_size, "max_length": s.max_length,
                            "batch_size": args.batch_size, "seed": args.seed} for b in run_backbones for m in methods])
        folder = runner.study_dir(args.storage, name, args.resume)
        runner.check_resume(name, folder, config, args.resume)

    all_backbones = list(dict.fromkeys(run_backbones + planned))
    estimated = to_estimate(args, gpu, run_backbones, all_backbones)
    if folder is not None:
        progress.start(folder)
    with progress.phase("plan", f"{len(methods)} methods × {len(all_backbones)} backbones: meta-device counts"
                        + (f" and fake-tensor memory estimates for {len(estimated)} backbones (Ray tasks)"
                           if estimated else "")):
        launch.init_ray(args.address)
        pairs = plan.plan_pairs(methods, all_backbones, batch_size=args.batch_size, seq_len=s.max_length,
                                budget=budget, estimate=estimated, cache_file=runner.plan_cache(args.storage),
                                progress=runner.log, compare_unquantized=args.dry_run)
        to_run = [p for p in pairs if p.runnable and p.backbone in run_backbones]
        if not args.dry_run:
            runner.log(f"plan: {len(to_run)} of {len(pairs)} pairs run here, every pair is recorded with its estimate")
    if args.dry_run:
        print_plan(pairs, budget, args.json, run_backbones)
        return

    groups, cost_groups = [], set()
    for p in to_run:
        name_, quant, gc = spaces.parse_method_spec(p.method)
        cost_only = (p.weights == "random" and args.cost_runs == "random") or (gc and twin(p.method) in methods)
        run = {"backbone": p.backbone, **spaces.run_fields(p.method), "task": args.task, "text_col": args.text_col,
               "label_col": args.label_col, "train_size": s.train_size, "max_length": s.max_length,
               "batch_size": args.batch_size, "seed": args.seed, "max_eval_examples": s.max_eval_examples,
               "epochs": s.cost_epochs if cost_only else s.epochs,
               "max_train_batches": s.cost_batches if cost_only else None, "weights": p.weights,
               "dtype": p.dtype, **({"zero": "on"} if p.zero else {})}
        # the paper's Fisher-pruned init (batch 1; 256 examples, not 1,024: time); a ZeRO-3 backbone gathers no
        # gradients (nor does a quantised one), so there LST keeps its L1 init
        if name_ == "lst" and not cost_only and not p.zero and quant == "none":
            run["method_config"] = {"importance": "fisher", "fisher_examples": min(256, s.train_size)}
        # a +gc twin's cost run: the method's reference settings (lr, default capacity), nothing searched
        space = {} if cost_only and p.weights != "random" else spaces.space(name_, backbones.get_spec(p.backbone).family)
        groups.append(Group(name=f"{p.method}|{p.backbone}", run=run, space=space,
                            n_trials=1 if cost_only else s.trials_per_method, resources=p.resources))
        if cost_only:
            cost_groups.add(groups[-1].name)
    plan_info = {"study": name, "config": config, "settings": s.__dict__, "methods": methods, "run_backbones": run_backbones,
                 "pairs": [{**p.as_dict(), **(p.memory or {})} for p in pairs]}
    tracking = trackers.callbacks(args.log, name, folder)  # --log: the same trackers see search and confirm
    trials, epochs = runner.execute(name, folder, groups, [p.estimated_row() for p in pairs], plan_info=plan_info,
                                    resume=args.resume, address=args.address, seed=args.seed, zero_ranks=args.zero_ranks,
                                    verbose=args.verbose, callbacks=tracking)
    searched = [g for g in groups if g.name not in cost_groups]
    seeds = [args.seed + 1 + i for i in range(s.confirm_seeds)]
    with runner.stop_signals() as received:  # as in the search: a signal stops gracefully, what finished is written
        trials, _ = confirm.run(name, folder, searched, trials, epochs, seeds=seeds, resume=args.resume,
                                seed=args.seed, zero_ranks=args.zero_ranks, log=runner.log, verbose=args.verbose,
                                callbacks=tracking)
    if received:
        raise runner.Interrupted(received[0])
    print(summary_table([t for t in trials if t["status"] != "estimated"]))
    print(f"\n{len(pairs) - len(to_run)} pairs estimated only (all {len(pairs)} planned rows in trials.parquet)")
    print(progress.where(folder, f"python -m analysis.report --scaling {folder}  (make study runs it)"))


if __name__ == "__main__":
    raise SystemExit(runner.main_guard(main))
