"""Placement: decides which models to prewarm on which workers; owns the catalog and admin verbs."""
