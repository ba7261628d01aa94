"""Defines and launches sets of trials and turns their outputs into Parquet."""
import trainables  # noqa: F401  (quiets bitsandbytes' import-time warning before anything imports it)
