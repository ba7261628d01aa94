"""Text-to-text classification for encoder–decoder backbones (T5), as the READ, LST and SHERL papers do it.

Each class is a target word sequence (its tokens, then the end token). Training is teacher
forced: the decoder reads [start] + target[:-1] and the loss is the mean token cross-entropy
of the true class's target through the backbone's own LM head. Prediction scores every class's
target (the sum of its tokens' log-probabilities) and takes the best; no generation loop is
needed because the candidates are known. Regression (STS-B) is encoded as T5 does it: the
label rounded to the nearest 0.2 and written out ("3.8"), one candidate per grid value; the
prediction is the value of the best-scoring candidate.

`LabelWords` holds the candidates as buffers. Without a tokenizer (meta counting, memory
estimates) it uses placeholder ids of the right shape; trials set the real ones from the
task's class names (`LabelWords.from_names`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REGRESSION_STEP = 0.2  # T5 writes STS-B scores rounded to 0.2 (Raffel et al. 2020, Sec. 2.4)
REGRESSION_RANGE = (0.0, 5.0)


def regression_grid(lo: float = REGRESSION_RANGE[0], hi: float = REGRESSION_RANGE[1]) -> list[float]:
    """The values a regression target is rounded to (STS-B: 0.0, 0.2, …, 5.0: 26 candidates)."""
    n = round((hi - lo) / REGRESSION_STEP)
    return [round(lo + k * REGRESSION_STEP, 1) for k in range(n + 1)]


MAX_REGRESSION_TARGETS = 101  # a 0-20 range at 0.2; STS-B needs 26


def regression_targets(labels: Sequence[float], task: str) -> list[float]:
    """The grid a task's regression labels are written on: spanning its training labels (STS-B: 0.0–5.0),
    so no target is silently clamped. ValueError when that takes more candidates than are worth scoring
    (a study checks this before anything starts)."""
    lo, hi = min(labels), max(labels)
    grid = regression_grid(math.floor(lo * 5) / 5, math.ceil(hi * 5) / 5)
    if len(grid) > MAX_REGRESSION_TARGETS:
        raise ValueError(f"{task}: regression labels span {lo:g}..{hi:g}, {len(grid)} values at T5's 0.2 step (at "
                         f"most {MAX_REGRESSION_TARGETS}: every one is scored each step); rescale the labels, e.g. "
                         "to 0-5 as STS-B")
    return grid


class LabelWords(nn.Module):
    """The candidates' decoder inputs, targets and masks (C×T), and, for regression, their values."""

    def __init__(self, targets: Sequence[Sequence[int]], start_id: int, values: Sequence[float] | None = None):
        super().__init__()
        width = max(len(t) for t in targets)
        tgt = torch.zeros(len(targets), width, dtype=torch.long)
        mask = torch.zeros(len(targets), width, dtype=torch.bool)
        for c, t in enumerate(targets):
            tgt[c, : len(t)] = torch.tensor(list(t))
            mask[c, : len(t)] = True
        dec_in = torch.cat([torch.full((len(targets), 1), start_id), tgt[:, :-1]], dim=1)
        self.register_buffer("target", tgt, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("decoder_input_ids", dec_in, persistent=False)
        self.register_buffer("values", torch.tensor(list(values or []), dtype=torch.float32), persistent=False)

    @property
    def n(self) -> int:
        return self.target.shape[0]

    @property
    def regression(self) -> bool:
        return self.values.numel() > 0

    @classmethod
    def placeholder(cls, n_labels: int, config: Any) -> LabelWords:
        """Shape-true stand-ins (one word + end token per class) for counting and estimating."""
        values = regression_grid() if n_labels == 1 else None
        n = len(values) if values else n_labels
        eos = int(config.eos_token_id or 1)
        return cls([[3 + c, eos] for c in range(n)], int(config.decoder_start_token_id or 0), values)

    @classmethod
    def from_names(cls, tokenizer: Any, names: Sequence[str], config: Any,
                   values: Sequence[float] | None = None) -> LabelWords:
        """Each name's tokens (no special tokens) plus the end token (T5's </s>; a borrowed BERT tokenizer's [SEP])."""
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        words = [tokenizer(name, add_special_tokens=False)["input_ids"] + [end] for name in names]
        if len({tuple(w) for w in words}) < len(words):
            raise ValueError(f"class names {list(names)} tokenise to identical targets; give them distinct words")
        return cls(words, int(config.decoder_start_token_id or 0), values)

    def expand(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder inputs and target mask for every (example, candidate) row: (B·C)×T."""
        return self.decoder_input_ids.repeat(batch, 1), self.mask.repeat(batch, 1)

    def scores(self, lm_logits: torch.Tensor) -> torch.Tensor:
        """(B·C)×T×V LM logits → B×C: each candidate's summed token log-probability."""
        logp = F.log_softmax(lm_logits.float(), dim=-1)
        rows = lm_logits.shape[0] // self.n
        tok = logp.gather(-1, self.target.repeat(rows, 1).unsqueeze(-1)).squeeze(-1)
        return (tok * self.mask.repeat(rows, 1)).sum(-1).view(rows, self.n)

    def classes_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Class ids, or for regression the index of the grid value nearest each label."""
        if not self.regression:
            return labels.long()
        return (labels.float().unsqueeze(-1) - self.values).abs().argmin(-1)

    def loss_and_logits(self, scores: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor | None,
                                                                                       torch.Tensor]:
        """Teacher-forced loss (mean token NLL of the true targets) and what the metric reads."""
        logits = self.values[scores.argmax(-1)].unsqueeze(-1) if self.regression else scores
        if labels is None:
            return None, logits
        cls = self.classes_of(labels)
        picked = scores.gather(1, cls.unsqueeze(1)).squeeze(1)
        return -picked.sum() / self.mask[cls].sum().clamp_min(1), logits


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The backbone's own LM head on decoder states, with T5's output scaling when its head is tied."""
    if getattr(model.config, "scale_decoder_outputs", False):
        hidden = hidden * model.config.d_model ** -0.5
    return model.lm_head(hidden.to(model.lm_head.weight.dtype))


def decode(model: nn.Module, encoder_out: torch.Tensor, attention_mask: torch.Tensor,
           words: LabelWords) -> torch.Tensor:
    """The (frozen or adapted) decoder over every candidate: (B·C)×T×d, after its final norm."""
    dec_in, dec_mask = words.expand(encoder_out.shape[0])
    return model.decoder(input_ids=dec_in, attention_mask=dec_mask,
                         encoder_hidden_states=encoder_out.repeat_interleave(words.n, 0),
                         encoder_attention_mask=attention_mask.repeat_interleave(words.n, 0)).last_hidden_state


def label_names(n_labels: int, names: Sequence[str] | None) -> list[str]:
    """Target words: the task's class names, else 'class 0', 'class 1', …"""
    return list(names) if names else [f"class {c}" for c in range(n_labels)]
