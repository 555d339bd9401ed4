"""Evaluation: pmod models in lmms-eval (the field's harness), with each request's cost measured beside its answer."""
