"""Trace-driven discrete-event simulator of a WarmServe cluster and of the systems it is compared with.

Virtual time, deterministic for a seed: engines stepping like vLLM under a roofline model of the device,
WarmServe driven by the services' own decision cores, the baselines by their own systems' rules
(docs/simulator.md).
"""
