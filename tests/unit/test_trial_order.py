"""Trial start order: longest first, so a study's tail has no idle slot; the order changes no result."""

from __future__ import annotations

from study import spaces
from study.launch import Group, GroupedSearch, longest_first


def _group(method: str, epochs: int = 4, train_size: int = 640, cost_only: bool = False) -> Group:
    run = {"backbone": "minilm-l6", "method": method, "epochs": epochs, "train_size": train_size,
           "max_train_batches": 6 if cost_only else None}
    name = f"{method}|{'llama-11m' if cost_only else 'minilm-l6'}|{epochs}x{train_size}"
    return Group(name=name, run=run, space=spaces.space(method, "bert"), n_trials=2)


def test_full_fine_tuning_then_graft_then_side_methods_and_cost_runs_last():
    groups = [_group("probe"), _group("read"), _group("lst"), _group("sherl"), _group("lora"), _group("full"),
              _group("full", cost_only=True), _group("lora", cost_only=True), _group("read", cost_only=True)]
    order = [g.name for g in longest_first(groups)]
    assert [n.split("|")[0] for n in order[:6]] == ["full", "lora", "probe", "read", "lst", "sherl"]
    assert all("llama-11m" in n for n in order[6:])  # cost-only runs last, in their given order
    assert [n.split("|")[0] for n in order[6:]] == ["full", "lora", "read"]


def test_within_a_method_more_optimisation_examples_start_first():
    groups = [_group("full", 6, 64), _group("read", 6, 512), _group("full", 6, 512), _group("full", 6, 256)]
    assert [g.name for g in longest_first(groups)] == ["full|minilm-l6|6x512", "full|minilm-l6|6x256",
                                                        "full|minilm-l6|6x64", "read|minilm-l6|6x512"]


def _suggestions(groups: list[Group], seed: int = 0) -> dict[str, list[dict]]:
    search = GroupedSearch(groups, metric="best_metric", mode="max", seed=seed)
    out: dict[str, list[dict]] = {}
    for i in range(sum(g.n_trials for g in groups)):
        config = search.suggest(f"t{i}")
        out.setdefault(config["group"], []).append(config["hp"])
    return out


def test_a_groups_sampled_hyperparameters_do_not_depend_on_the_group_order():
    groups = [_group("read"), _group("lora"), _group("full")]
    forward, backward = _suggestions(groups), _suggestions(groups[::-1])
    assert forward == backward
    assert _suggestions(groups, seed=1) != forward  # the study seed still moves them
