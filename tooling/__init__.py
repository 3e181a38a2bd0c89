"""Operator and developer tooling: the warmserve CLI, the local-cluster launcher, the tiny-model generator and
the trace and workload loaders. Services import none of it."""
