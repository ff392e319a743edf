"""Cohort analysis on predicted slides, one job per module: clinical (import), features
(patient pooling), groups (risk groups), compare (tests between groups), multitest (BH, Holm),
survival (KM, log-rank, Cox, RMST). Numbers only: figures are in ghist_core.viz."""
