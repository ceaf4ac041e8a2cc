"""Infrastructure every wing uses: atomic files and output sets (:mod:`~hdkd.infra.io`), reproducible numerics
(:mod:`~hdkd.infra.numerics`), devices and torchrun (:mod:`~hdkd.infra.distributed`), provenance (git, DVC,
library versions: :mod:`~hdkd.infra.provenance`) and MLflow: the store (:mod:`~hdkd.infra.mlflow_store`), the
write side a stage uses (:mod:`~hdkd.infra.tracking`) and the read side the report and Ray use
(:mod:`~hdkd.infra.mlflow_runs`).

May import: the top-level modules (:mod:`hdkd.config`, :mod:`hdkd.roster`, :mod:`hdkd.geometry`), never another
wing (``.importlinter``). Torch only inside the functions that need it, so that the torch-free wings stay so.
"""
