"""Helpers for tests and local mirrors (never imported by the product code)."""
