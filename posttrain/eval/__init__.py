"""Metrics and diagnostics."""
