"""Evidence from results bundles, torch-free: the bundle (:mod:`~hdkd.evidence.bundle`), aggregates and paired
comparisons across seeds (:mod:`~hdkd.evidence.aggregate`), the statistics (:mod:`~hdkd.evidence.stats`) and the
figures (:mod:`~hdkd.evidence.plots`).

May import: :mod:`hdkd.infra` and the top-level modules; never torch (``.importlinter``), so the report stage
and its check stay cheap.
"""
