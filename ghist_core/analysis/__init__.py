"""Cohort analysis on predicted slides: clinical tables, patient features, groups, survival, tests."""
