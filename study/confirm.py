"""The confirm phase: each searched method's best configuration re-run with fresh seeds.

A search picks the maximum over its trials, so the winner's score is biased upward and
says nothing about seed-to-seed spread. After the search, every group that searched
(pretrained backbones; cost-only runs are not confirmed) gets its winning trial's whole
run config (`best_runs`: selected on validation) re-run once per confirm seed, to the full
epoch budget (no early stopping), as its own Tune experiment in `<study>/confirm/`. Each
confirm run scores its final model on the held-out test split (`eval_test`): `test_metric`
on its row (`role=confirm`) and its per-example predictions, collected into
`predictions.parquet` beside trials.parquet. study.quality turns the seeds' test scores into
a mean with a Student-t 95% CI: selection reads validation, reporting reads test.

The seed also draws the training subsample (`train_size`), the head's init and the data
order, so the CI covers all three; side methods build one activation cache per seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from study import collect, evp, launch, prepare, progress, quality, schema
from study.launch import Group
from study.storage import Location

CONFIRM = "confirm"  # the confirm experiment's folder inside the study folder
SEEDS = (1, 2, 3)  # the search runs seed 0 (the study's --seed); confirm seeds are fresh
SUFFIX = "|confirm-s"  # a confirm group's name: <searched group>|confirm-s<seed>


def best_runs(grid: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per group in `names`: {"run": run config, "hp": searched values} of its winning search trial.

    The winner is picked on what the searcher (ASHA + TPE) optimised: `final_metric`, the validation
    metric after the last epoch, among the finished trials that ran their whole epoch budget; a trial
    ASHA stopped early competes only when no trial of its group ran the whole budget. Never the maximum
    over epochs (`best_metric`): the confirm runs report the final epoch's model, so the winner is too.
    """
    best: dict[str, tuple[tuple[bool, float], dict[str, Any]]] = {}
    for result in grid:
        config = result.config or {}
        name, metrics = config.get("group"), result.metrics or {}
        score = metrics.get("final_metric")
        if name not in names or metrics.get("status") != "ok" or score is None or result.error is not None:
            continue
        key = (not collect.early_stopped(metrics, config["run"]), float(score))  # full budget first, then score
        if name not in best or key > best[name][0]:
            best[name] = (key, {"run": dict(config["run"]), "hp": dict(config.get("hp") or {})})
    return {name: winner for name, (_, winner) in best.items()}


def confirm_groups(groups: Sequence[Group], best: dict[str, dict[str, Any]], seeds: Sequence[int]) -> list[Group]:
    """One single-trial group per (searched group with a winner, seed), scored on the test split at the end."""
    return [Group(name=f"{g.name}{SUFFIX}{seed}", run={**best[g.name]["run"], "seed": seed, "eval_test": True},
                  space={}, n_trials=1, resources=g.resources)
            for g in groups if g.name in best for seed in seeds]


def folder_of(study_folder: str) -> str:
    return str(study_folder).rstrip("/") + "/" + CONFIRM


def run(name: str, folder: str, searched: Sequence[Group], trials: list[dict], epochs: list[dict], *,
        seeds: Sequence[int] = SEEDS, resume: bool, seed: int, zero_ranks: int = 1,
        log: Callable[[str], None] = print, callbacks: Sequence[Any] = (),
        verbose: bool = False) -> tuple[list[dict], list[dict]]:
    """Confirm the searched groups' winners; returns all rows (search + confirm) and writes the tables."""
    out = Location.of(folder)  # the study's storage, local or cloud, as runner.execute
    grid = launch.results(folder)
    best = best_runs(grid, [g.name for g in searched]) if grid is not None else {}
    groups = confirm_groups(searched, best, seeds)
    missing = sorted({g.name for g in searched} - set(best))
    predictions: list[dict] = []  # per test example, re-read from every confirm trial's checkpoint (also on resume)
    if missing:
        log(f"confirm: no finished trial to confirm for {', '.join(missing)}")
    if groups:
        with progress.phase("caches", "activation caches for the confirm runs"):
            groups = prepare.with_caches(groups, folder, log, ranks=zero_ranks)
        where, stopped = folder_of(folder), None
        try:
            with progress.phase("confirm", f"{len(best)} best configurations × {len(seeds)} seeds ({len(groups)} "
                                           "trials, no early stopping)"), \
                    progress.watch("confirm", groups, folder, f"{where}/{launch.EXPERIMENT}", verbose=verbose) as console:
                launch.run(groups, where, seed=seed, resume=resume, early_stopping=False,
                           callbacks=[*console, *callbacks], verbose=verbose)
            grid = launch.results(where)  # as saved: also right about trials a signal stopped mid-way
        except (KeyboardInterrupt, Exception) as exc:  # what finished is written first, as runner.execute does
            stopped, grid = exc, launch.results(where)
            log("confirm stopped: writing what finished; continue with --resume")
        if grid is not None:
            rows, more = collect.rows_from_results(name, grid, collect.environment(), role="confirm")
            group_of = {str((r.metrics or {}).get("trial_id") or Path(r.path).name): (r.config or {}).get("group", "")
                        for r in grid}  # rows skip trials that never reported: matched by id, not position
            for row in rows:  # the winner's searched values, for the record
                searched_name = str(group_of.get(row["trial_id"], "")).rsplit(SUFFIX, 1)[0]
                row.update({f"hp.{k}": v for k, v in best.get(searched_name, {}).get("hp", {}).items()})
            trials, epochs = trials + rows, epochs + more
            collect.write(out, trials, epochs)
            predictions = collect.prediction_rows(name, grid)
            schema.write_predictions(predictions, out / "predictions.parquet")
        if stopped is not None:
            write_quality(out, trials, predictions)
            raise stopped
    trials = collect.with_cache_shares(trials)
    collect.write(out, trials, epochs)
    write_quality(out, trials, predictions)
    return trials, epochs


def write_quality(out: Location, trials: list[dict], predictions: list[dict] | None = None) -> Location:
    """quality.parquet from the finished rows (`weights` says which are random: their metric means nothing);
    `predictions` (the confirm runs') add the intervals with evaluation-set noise; evp.parquet beside it: the
    expected best validation score of k search trials per method (study.evp)."""
    rows = quality.quality_rows(trials, predictions)
    schema.write_evp(evp.evp_rows(trials), out / "evp.parquet")
    return schema.write_quality(rows, out / "quality.parquet")
