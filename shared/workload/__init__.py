"""Workloads built from the real traces the project ships (``shared/traces``): loaders and synthesis."""
