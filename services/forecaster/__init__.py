"""The forecaster: per-model load forecasts from real arrivals."""
