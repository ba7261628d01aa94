"""The one contract-test table: every registered method, its config for tiny backbones, and an lr.

A new method is one file in trainables/methods/ plus one row here; test_method_contracts.py
and test_loop.py both fail until the row exists.
"""

from __future__ import annotations

from typing import Any

# method -> (config for tiny backbones, lr that makes a dozen steps visibly learn)
ROWS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({}, 1e-3),
    "bitfit": ({}, 1e-2),
    "lora": ({"r": 4}, 1e-2),
    "ia3": ({}, 3e-2),
    "prompt": ({"n_virtual_tokens": 4}, 3e-1),
    "adapter": ({}, 1e-2),
    "read": ({"hidden_size": 32}, 1e-2),
    "lst": ({"r": 4}, 3e-3),
    "sherl": ({"r": 4}, 3e-3),
    "probe": ({}, 1e-1),
}
