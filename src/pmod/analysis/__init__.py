"""Measurements of routed models: analytic FLOPs and KV bytes, routing statistics, plots."""
