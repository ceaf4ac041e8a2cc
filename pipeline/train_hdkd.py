"""DVC stage `train_hdkd`: train the HDKD student, distilled from the trained teacher -> models/hdkd.

`python -m pipeline.train_hdkd`; on several GPUs or nodes: `torchrun --nproc_per_node N -m pipeline.train_hdkd`.
Options (paths, resume directory): `python -m pipeline.train_hdkd --help`.
"""

from pipeline import start
from pipeline._train import main

if __name__ == "__main__":
    start()
    main("hdkd")
