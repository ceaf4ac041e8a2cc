"""DVC stage `distill`: train the HDKD student, distilled from the trained teacher -> models/hdkd.

`python -m pipeline.distill`; on several GPUs or nodes: `torchrun --nproc_per_node N -m pipeline.distill`.
Options (paths, resume directory): `python -m pipeline.distill --help`.
"""

from hdkd.train import main

if __name__ == "__main__":
    main("hdkd")
