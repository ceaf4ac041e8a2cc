"""DVC stage `train_teacher`: train the CNN teacher -> models/teacher.

`python -m pipeline.train_teacher`; on several GPUs or nodes: `torchrun --nproc_per_node N -m pipeline.train_teacher`.
Options (paths, resume directory): `python -m pipeline.train_teacher --help`.
"""

from pipeline import start
from pipeline._train import main

if __name__ == "__main__":
    start()
    main("teacher")
