"""The DVC stages. Every stage imports this package first (`python -m pipeline.<stage>`, `dvc repro`,
`dvc exp run`, `torchrun -m`), so it sets the reproducible-numerics environment before torch loads.

The stages read params.yaml (dvc.yaml runs them without --params; `dvc exp run -S` edits that file).
A stage given another file with --params still gets the environment unless params.yaml switches
the mode off; the training code then checks that its own file's setting can hold.
"""

from hdkd import numerics

if numerics.reproducible_in("params.yaml"):
    numerics.apply_env()
