"""The five WarmServe services. Each is its own package and process; they share only ``shared``."""
