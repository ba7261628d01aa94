"""Analysis of study results: reads the Parquet tables only and states a verdict per claim.

`claims` holds the computations and the verdict rules, `plots` the figures, `report`
runs the notebooks with papermill. Imports nothing from the project but `study.schema`.
"""
