"""Trace-driven discrete-event simulator of a WarmServe cluster (and of the systems it is compared with).

Virtual time, deterministic for a seed, driving the real pure policies from ``shared/policy``.
"""
