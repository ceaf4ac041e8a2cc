"""Training: the losses (:mod:`~hdkd.training.losses`), the engine (one model fitted, with resume:
:mod:`~hdkd.training.engine`), one (seed, fraction) run (:mod:`~hdkd.training.run`), the executors that train a
stage's runs here or on a Ray cluster (:mod:`~hdkd.training.local_executor`, :mod:`~hdkd.training.ray_executor`)
and the training stage (:mod:`~hdkd.training.stage`).

May import: :mod:`hdkd.models`, :mod:`hdkd.data`, :mod:`hdkd.evidence` (figures), :mod:`hdkd.infra` and the
top-level modules; never :mod:`hdkd.evaluation`, :mod:`hdkd.report` nor :mod:`hdkd.use`. The executors import
the run; the run imports neither.
"""
