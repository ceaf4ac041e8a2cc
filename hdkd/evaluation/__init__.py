"""Evaluation of trained models on the test split: metrics (:mod:`~hdkd.evaluation.metrics`), efficiency
(parameters, FLOPs, latency: :mod:`~hdkd.evaluation.efficiency`) and the evaluate stage, which writes the
results bundle (:mod:`~hdkd.evaluation.evaluate`).

May import: :mod:`hdkd.evidence`, :mod:`hdkd.models`, :mod:`hdkd.data`, :mod:`hdkd.infra` and the top-level
modules; never :mod:`hdkd.training` nor :mod:`hdkd.use`.
"""
