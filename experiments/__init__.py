"""Experiments: scripts that reproduce result tables (not tests)."""
