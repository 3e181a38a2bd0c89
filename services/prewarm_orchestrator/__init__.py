"""The prewarm orchestrator: executes placement plans on the workers and records their history."""
