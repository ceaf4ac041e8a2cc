"""DVC stage `train_baseline@<key>`: train the comparison baseline `baselines.<key>` of params.yaml (a timm
architecture, from scratch, cross-entropy, like the plain student) -> models/<key>.

`python -m pipeline.train_baseline <key>`; on several GPUs:
`torchrun --nproc_per_node N -m pipeline.train_baseline <key>`.
Options (paths, resume directory): `python -m pipeline.train_baseline <key> --help`.
"""

from pipeline import start
from pipeline._train import main

if __name__ == "__main__":
    start()
    main(None)
