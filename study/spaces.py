"""Per-method search spaces (Optuna distributions), centred on the reference learning rates.

Every method gets the learning rate (log-uniform, a factor 10 either side of its
reference in METHODS.md) plus its one capacity knob, and the study gives every method
the same number of trials, so comparisons after tuning are fair. Keys without a prefix
are trial settings (RunConfig fields); `m.<key>` keys go to the method's config.
"""

from __future__ import annotations

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from trainables.methods import get_method

_CAPACITY: dict[str, dict[str, list]] = {
    "full": {},
    "bitfit": {},
    "ia3": {},
    "lora": {"m.r": [4, 8, 16]},
    "adapter": {"m.reduction_factor": [8, 16, 32]},
    "prompt": {"m.n_virtual_tokens": [10, 20]},
    "read": {"m.hidden_size": [64, 128, 256]},
    "lst": {"m.r": [4, 8]},
    "sherl": {"m.r": [4, 8]},
    "probe": {},
}


def space(method: str, lr_span: float = 10.0) -> dict[str, BaseDistribution]:
    if method not in _CAPACITY:
        raise ValueError(f"no search space for method {method!r}; defined: {', '.join(_CAPACITY)}")
    ref = get_method(method).reference_lr
    out: dict[str, BaseDistribution] = {"lr": FloatDistribution(ref / lr_span, min(ref * lr_span, 1.0), log=True)}
    out.update({k: CategoricalDistribution(v) for k, v in _CAPACITY[method].items()})
    return out


def split_hp(hp: dict) -> tuple[dict, dict]:
    """Searched values → (RunConfig overrides, method config overrides)."""
    run = {k: v for k, v in hp.items() if not k.startswith("m.")}
    method = {k[2:]: v for k, v in hp.items() if k.startswith("m.")}
    return run, method
