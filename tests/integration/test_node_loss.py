"""A worker node lost mid-study (ray.cluster_utils.Cluster: a head with no CPU for trials and two worker nodes,
results in S3 on loopback): the trial on the removed node restarts from its last checkpoint on the other node
(Tune's FailureConfig), and every trial is recorded exactly once."""

from __future__ import annotations

from typing import Any

import pytest
from ray.tune import Callback
from s3server import moto_s3

pytestmark = pytest.mark.integration


SEEN: dict[str, Any] = {}  # what the callback saw: Tune deep-copies and pickles its callbacks, a module's dict stays


class LoseANode(Callback):
    """Removes the node of the first trial that has checkpointed an epoch; records what follows in SEEN."""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        SEEN["results"].append((trial.trial_id, result.get("epoch"), result.get("node_id")))
        if SEEN["lost"] is None and result.get("epoch") == 1:
            cluster = SEEN["cluster"]
            node = next(n for n in cluster.worker_nodes if n.node_id == result["node_id"])
            SEEN["lost"] = (trial.trial_id, node.node_id)
            cluster.remove_node(node, allow_graceful=False)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        SEEN["recovered"].append((trial.trial_id, len(SEEN["results"])))


def test_a_trial_on_a_lost_node_resumes_on_the_other_and_is_recorded_once(tmp_path, monkeypatch):
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster

    from study import launch, runner

    run = {"backbone": "llama-tiny", "method": "lora", "task": "synthetic", "epochs": 3, "train_size": 256,
           "max_length": 16, "batch_size": 16, "max_eval_examples": 32, "measure_memory": False}
    groups = [launch.Group("lora|tiny", run, {}, 2, {"cpu": 1})]

    with moto_s3("petl") as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
            "health_check_period_ms": 500, "health_check_failure_threshold": 3}})  # a lost node noticed in ~2 s
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        SEEN.update(cluster=cluster, lost=None, results=[], recovered=[])
        try:
            folder = runner.study_dir("s3://petl/node-loss", "lost", resume=False)
            trials, _ = runner.execute("lost", folder, groups, [], plan_info={}, resume=False,
                                       address=cluster.address, seed=0, early_stopping=False, callbacks=[LoseANode()])
        finally:
            ray.shutdown()
            cluster.shutdown()
        stored = pd.read_parquet("s3://petl/node-loss/lost/trials.parquet")

    assert SEEN["lost"] is not None, SEEN["results"]
    lost_trial, lost_node = SEEN["lost"]
    assert [t for t, _ in SEEN["recovered"]] == [lost_trial]  # one restart, of the trial on the removed node
    at = SEEN["recovered"][0][1]
    before = [epoch for t, epoch, _ in SEEN["results"][:at] if t == lost_trial]
    after = [(epoch, node) for t, epoch, node in SEEN["results"][at:] if t == lost_trial]
    assert after[0][0] == max(before) + 1, (before, after)  # from its last checkpoint, not from scratch
    assert lost_node not in {node for _, node in after} and after[-1][0] == run["epochs"]  # on the other node
    assert len(stored) == 2 and stored.trial_id.is_unique, stored[["trial_id", "status"]]
    assert set(stored.status) == {"ok"} and len(trials) == 2
    print(f"node loss: {len(stored)} trials, {len(SEEN['recovered'])} restart(s) (epochs {before} then {[e for e, _ in after]}), {len(stored)} rows; "
          f"results {SEEN['results']}")
