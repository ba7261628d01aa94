"""`python -m study.convergence`: optimisation steps to a fixed threshold vs training-set size, per method.

Methods × training-set sizes × seeds on a pretrained backbone with a fixed, generous epoch budget
and no early stopping, recording the validation metric every epoch (and, after the last epoch, the
final model's test score). Two settings keep the comparison about convergence and fair to READ:

- a constant learning rate after warm-up (`lr_schedule="constant"`): a linear decay to zero at the
  budget's last step would make every method peak at the last epoch whatever its speed;
- each method at settings tuned on this backbone and task: its confirmed winner (role "confirm"
  rows: the learning rate and its searched method knobs — READ's output scale and hidden size
  among them) in a scaling study's `trials.parquet` (`--tuned-from`, default `<storage>/scaling`
  when it has one), from the training size nearest to each size run here. A method that study
  lacks runs at its reference learning rate, with a warning. Every row records where its settings
  came from in `hp.tuned_from` ("<study> (n=<size>)" or "reference") beside the `hp.*` values used.

analysis/convergence.py holds every trial of a (backbone, task, size) to one threshold and compares
the steps to reach it (right-censored at the budget) across methods.
"""

from __future__ import annotations

import argparse
from typing import Any

import pyarrow as pa

from study import collect, plan, progress, runner, trackers
from study.collect import summary_table
from study.launch import Group
from study.spaces import run_fields, split_hp
from study.storage import Location, StorageError
from trainables.backbones import get_spec, load_tokenizer

REFERENCE = "reference"
DEFAULT_SEEDS = list(range(8))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m study.convergence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 512], help="training-set sizes")
    p.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS,
                   help="seeds per method and size (default 8): the verdict's exact log-rank test, Holm-corrected "
                        "over 3 sizes × 3 comparators, cannot reach p < 0.05 below 6")
    p.add_argument("--epochs", type=int, default=6, help="fixed epoch budget (no early stopping)")
    p.add_argument("--max-eval-examples", type=int, default=500, help="500: one example is 0.2 points")
    p.add_argument("--tuned-from", default=None, metavar="STUDY_DIR",
                   help="a scaling study (folder or URI) whose confirmed winners give each method's settings; "
                        "default <storage>/scaling when it has a trials.parquet; 'none': every method at its "
                        "reference learning rate")
    p.add_argument("--quick", action="store_true", help="a ~2 minute smoke study")
    runner.add_common_args(p, name="convergence")
    return p.parse_args(argv)


def _plain(value: Any, typ: pa.DataType) -> Any:
    """A Parquet cell as the Python value a RunConfig or method config takes (ints stay ints)."""
    if pa.types.is_integer(typ):
        return int(value)
    if pa.types.is_floating(typ):
        return float(value)
    return value.item() if hasattr(value, "item") else value


def tuned_settings(study_dir: str, methods: list[str], backbone: str, task: str,
                   sizes: list[int]) -> dict[tuple[str, int], dict[str, Any]]:
    """{(method, size): hp} from a study's confirmed winners on this backbone and task; hp["tuned_from"] says whence.

    The confirm rows of one searched group share its winner's `hp.*` values; where the study ran
    several training sizes, each size here takes the nearest one's winner (ties: the larger). A
    method without confirm rows there gets {"tuned_from": "reference"} (its reference lr).
    """
    found: dict[tuple[str, int], dict[str, Any]] = {}
    table = (Location.of(study_dir) / "trials.parquet").read_parquet()
    hp_cols = [c for c in table.column_names if c.startswith("hp.")]
    rows = table.select(["method", "backbone", "task", "train_size", "role", *hp_cols]).to_pandas()
    rows = rows[(rows["role"] == "confirm") & (rows["backbone"] == backbone) & (rows["task"] == task)]
    for m in methods:
        mine = rows[rows["method"] == m].dropna(subset=["train_size"])
        for n in sizes:
            if mine.empty:
                found[(m, n)] = {"tuned_from": REFERENCE}
                continue
            nearest = min(mine["train_size"].unique(), key=lambda s: (abs(int(s) - n), -int(s)))
            winner = mine[mine["train_size"] == nearest]
            hp = {}
            for col in hp_cols:
                values = winner[col].dropna()
                if not values.empty:  # one winner per group: every confirm seed carries the same value
                    hp[col[len("hp."):]] = _plain(values.mode().iloc[0], table.schema.field(col).type)
            found[(m, n)] = {**hp, "tuned_from": f"{str(study_dir).rstrip('/')} (n={int(nearest)})"}
    return found


def settings_source(args: argparse.Namespace) -> str | None:
    """The study to take tuned settings from: --tuned-from, else <storage>/scaling if it has trials; None: reference."""
    if args.tuned_from is not None:
        if args.tuned_from.lower() == "none":
            return None
        try:
            if not (Location.of(args.tuned_from) / "trials.parquet").is_file():
                raise runner.UsageError(f"--tuned-from {args.tuned_from}: no trials.parquet there")
        except StorageError as exc:
            raise runner.UsageError(f"--tuned-from {args.tuned_from}: {exc}") from None
        return args.tuned_from
    default = Location.of(args.storage) / "scaling"
    try:
        return str(default) if (default / "trials.parquet").is_file() else None
    except StorageError:
        return None


def with_settings(rows: list[dict[str, Any]], settings: dict[tuple[str, int], dict[str, Any]]) -> list[dict]:
    """Each trial row with its method's settings as `hp.*` columns (hp.tuned_from among them)."""
    for row in rows:
        hp = settings.get((row.get("method"), row.get("train_size")))
        if hp is not None and row.get("status") != "estimated":
            row.update({f"hp.{k}": v for k, v in hp.items()})
    return rows


def build_groups(args: argparse.Namespace, methods: list[str], settings: dict[tuple[str, int], dict[str, Any]],
                 resources: dict[str, float], max_length: int) -> list[Group]:
    """One single-trial group per size × seed × method: constant lr after warm-up, test scored, tuned settings."""
    groups = []
    for n in args.sizes:
        for seed in args.seeds:
            for m in methods:
                run_hp, method_hp = split_hp({k: v for k, v in settings[(m, n)].items() if k != "tuned_from"})
                groups.append(Group(
                    name=f"{m}|{args.backbone}|n{n}|s{seed}", space={}, n_trials=1, resources=resources,
                    run={"backbone": args.backbone, **run_fields(m), "task": args.task, "text_col": args.text_col,
                         "label_col": args.label_col, "train_size": n, "seed": seed, "epochs": args.epochs,
                         "max_length": max_length, "batch_size": args.batch_size,
                         "max_eval_examples": args.max_eval_examples, "lr_schedule": "constant", "eval_test": True,
                         **run_hp, **({"method_config": method_hp} if method_hp else {})}))
    return groups


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.quick:
        args.sizes, args.seeds, args.epochs, args.max_eval_examples = [64, 256], [0], 3, 200
    methods = runner.method_labels(args, ["read", "lora", "adapter", "full"])  # labels: lora@nf4+gc
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

    source = settings_source(args)
    if source is None:
        settings = {(m, n): {"tuned_from": REFERENCE} for m in methods for n in args.sizes}
    else:
        settings = tuned_settings(source, methods, args.backbone, args.task, args.sizes)

    budget = plan.Budget.detect(gpu_memory_gib=args.gpu_memory_gib)
    resources = {"cpu": budget.cpus_per_trial, **({"gpu": budget.gpus_per_trial} if budget.gpus_per_trial else {})}
    groups = build_groups(args, methods, settings, resources, max_length)
    runner.check_runs([g.run for g in groups])
    folder = runner.study_dir(args.storage, name, args.resume)
    config = {"study": "convergence", "methods": methods, "backbone": args.backbone, "sizes": args.sizes,
              "seeds": args.seeds, "epochs": args.epochs, "task": args.task, "text_col": args.text_col,
              "label_col": args.label_col, "max_length": max_length, "batch_size": args.batch_size,
              "max_eval_examples": args.max_eval_examples, "seed": args.seed, "lr_schedule": "constant",
              "settings": {f"{m}|n{n}": hp for (m, n), hp in sorted(settings.items())}}
    runner.check_resume(name, folder, config, args.resume)
    progress.start(folder)
    # where each method's settings come from: said once the input is known to be good (bad input is one line)
    untuned = sorted({m for (m, _), hp in settings.items() if hp["tuned_from"] == REFERENCE})
    if untuned:
        where = f"in {source} on {args.backbone} / {args.task}" if source else "(no tuned study: --tuned-from)"
        runner.log(f"warning: no confirmed winner {where} for {', '.join(untuned)}: "
                   "at the reference learning rate, untuned")
    for (m, n), hp in sorted(settings.items()):
        if hp["tuned_from"] != REFERENCE:
            runner.log(f"{m} n={n}: {', '.join(f'{k}={v}' for k, v in hp.items() if k != 'tuned_from')} "
                       f"(from {hp['tuned_from']})")
    plan_info = {"study": name, "config": config, "methods": methods, "backbone": args.backbone, "sizes": args.sizes,
                 "seeds": args.seeds, "epochs": args.epochs}
    trials, epochs = runner.execute(name, folder, groups, [], plan_info=plan_info, resume=args.resume,
                                    address=args.address, seed=args.seed, early_stopping=False,
                                    zero_ranks=args.zero_ranks, verbose=args.verbose,
                                    callbacks=trackers.callbacks(args.log, name, folder),
                                    role="confirm")  # fixed (confirmed) settings per seed, scored on test: no search
    trials = with_settings(collect.with_cache_shares(trials), settings)  # cached trials carry their cache share
    collect.write(folder, trials, epochs)
    print(summary_table(trials))
    print()
    print(progress.where(folder, f"python -m analysis.report --convergence {folder}"))


if __name__ == "__main__":
    raise SystemExit(runner.main_guard(main))
