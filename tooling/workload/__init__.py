"""Workloads built from the real traces the project ships (``tooling/traces``): loaders and synthesis."""
