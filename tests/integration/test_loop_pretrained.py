"""The loop on the real pretrained MiniLM-L6 and the VADER movie snippets (offline assets).

A few hundred examples and two epochs are enough for READ and LoRA to beat always
answering the majority class of the validation examples we evaluate on.
"""

from __future__ import annotations

from collections import Counter

import pytest

from trainables import tasks
from trainables.backbones import get_spec, load_tokenizer
from trainables.loop import RunConfig, eval_subset, train

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

BASE = dict(backbone="minilm-l6", task="vader-movies", train_size=320, max_length=32, epochs=2, batch_size=16,
            max_eval_examples=256, device="cpu", weights="pretrained", measure_memory=False)
# READ at its reference lr; LoRA's reference lr (3e-4) needs more than 40 steps to move the fresh head
RUNS = {"read": {}, "lora": {"lr": 2e-3}}



@pytest.fixture(scope="module")
def majority_accuracy() -> float:
    """Accuracy of always predicting the most frequent label of the evaluated validation examples."""
    tokenizer = load_tokenizer(get_spec("minilm-l6"))
    task = tasks.load_task("vader-movies", tokenizer, max_length=32, train_size=BASE["train_size"])
    labels = eval_subset(task.validation, BASE["max_eval_examples"])["labels"]
    return Counter(labels).most_common(1)[0][1] / len(labels)


@pytest.mark.parametrize("method", sorted(RUNS))
def test_pretrained_minilm_beats_the_majority_class(method, majority_accuracy, tmp_path):
    summary = train(RunConfig(method=method, **BASE, **RUNS[method]), tmp_path)
    assert summary["status"] == "ok", summary["error"]
    assert summary["metric_name"] == "accuracy" and summary["epochs_run"] == 2
    assert summary["best_metric"] > majority_accuracy + 0.05, (summary["best_metric"], majority_accuracy)
