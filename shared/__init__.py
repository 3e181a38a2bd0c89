"""WarmServe's common library: bus contracts, settings, telemetry, storage and pure policy.

Services import from here and never from each other.
"""
