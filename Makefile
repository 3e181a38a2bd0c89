# Shortcuts for ./dev (which creates .venv on first use).
.PHONY: up test loadtest loadtest-sim

up:
	./dev up

test:
	./dev test

# 5-minute replay of the shipped traces on the local cluster with real vLLM CPU inference, prewarming on,
# off, and off with idle copies kept (keep-alive); table on stdout, JSON and PNG in docs/benchmarks/replay_real.*
loadtest:
	./dev loadtest --mode real --duration 300 --runs on,off,keepalive

# the same against 32 sim workers (the control plane under multi-model load): docs/benchmarks/replay_sim.*
loadtest-sim:
	./dev loadtest --mode sim --duration 300 --runs on,off,keepalive
