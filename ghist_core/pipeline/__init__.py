"""Slide → cells → AnnData, in checkpointed blocks; the run worker and the cohort runner."""
