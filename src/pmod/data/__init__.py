"""LLaVA-format data: a synthetic VQA generator, record checking, tokenised samples, collator and sampler.

Submodules import torch/transformers only where needed: ``llava_format`` and ``synth`` need neither.
"""
