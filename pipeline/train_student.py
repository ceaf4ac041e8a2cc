"""DVC stage `train_student`: train the hybrid student without distillation (the baseline) -> models/student.

`python -m pipeline.train_student`; on several GPUs or nodes: `torchrun --nproc_per_node N -m pipeline.train_student`.
Options (paths, resume directory): `python -m pipeline.train_student --help`.
"""

from pipeline import start
from pipeline._train import main

if __name__ == "__main__":
    start()
    main("student")
