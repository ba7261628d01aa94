"""Tiny random configs of every supported family beyond the registry's llama/bert, as HF folders.

Written once per machine (config.json only, from each family's own config class) under the
temp dir, so tests can pass a folder path wherever a backbone name goes: the resolver reads
it like any local checkpoint folder. Sizes are llama-tiny's (d=64, 2 blocks) so every method's
contract tests stay fast on one thread.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from transformers import AutoConfig

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)
CONFIGS = {
    "mistral": dict(COMMON, num_key_value_heads=2, max_position_embeddings=128, sliding_window=64, pad_token_id=0),
    "qwen2": dict(COMMON, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0),
    "roberta": dict(COMMON, max_position_embeddings=130, pad_token_id=1),
}


def folder(model_type: str, root: Path | None = None) -> str:
    """The folder holding `model_type`'s tiny config (written when absent)."""
    root = root or Path(tempfile.gettempdir()) / f"petl-tiny-families-{os.getuid()}"
    out = root / model_type
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp:  # concurrent test processes: write, then rename
            AutoConfig.for_model(model_type, **CONFIGS[model_type]).save_pretrained(tmp)
            os.replace(Path(tmp) / "config.json", out / "config.json")
    return str(out)


FOLDERS = [folder(t) for t in CONFIGS]
