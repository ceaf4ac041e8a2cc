"""DVC stage `train_kd@<key>`: train the comparison distillation method `kd.<key>` of params.yaml (DeiT into a
ViT, logit-only or aligned-feature distillation), distilled from the trained teacher -> models/<key>.

`python -m pipeline.train_kd <key>`; on several GPUs: `torchrun --nproc_per_node N -m pipeline.train_kd <key>`
(not method aligned: its projectors train in one process).
Options (paths, resume directory): `python -m pipeline.train_kd <key> --help`.
"""

from pipeline import start
from pipeline._train import main

if __name__ == "__main__":
    start()
    main(None, group="kd")
