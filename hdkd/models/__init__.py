"""HDKD networks: blocks, the CNN teacher, the hybrid student and a registry of named configurations; the timm
baselines, model files (:mod:`~hdkd.models.checkpoint`) and the official implementation's checkpoints
(:mod:`~hdkd.models.compat`).

May import: :mod:`hdkd.infra` and the top-level modules.
"""

from hdkd.models.blocks import CBAM, InvertedResidual, SqueezeExcite, StemBlock, make_stage
from hdkd.models.frozen import FrozenTeacher
from hdkd.models.networks import HybridStudent, StagedNetwork, StageSpec, TeacherCNN
from hdkd.models.registry import TIMM_PREFIX, create_model, list_models, model_name
from hdkd.models.transformer import DFLT, TransformerSpec

__all__ = [
    "CBAM", "DFLT", "FrozenTeacher", "HybridStudent", "InvertedResidual", "SqueezeExcite", "StageSpec", "StagedNetwork",
    "StemBlock", "TIMM_PREFIX", "TeacherCNN", "TransformerSpec", "create_model", "list_models", "make_stage",
    "model_name",
]
