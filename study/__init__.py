"""Defines and launches sets of trials and turns their outputs into Parquet."""
