"""The networks' rule for image sizes, torch-free so that ``params.yaml`` is checked with it too.

Both networks run a stem of stride ``stem_stride`` and two stride-2 stages; the student's
transformer then cuts the stage-3 map into ``PATCH_SIZE`` x ``PATCH_SIZE`` patches.
"""

from __future__ import annotations

PATCH_SIZE = 2  # the student's transformer patches (hdkd.models.HybridStudent's default)


def image_size_step(stem_stride: int, patch_size: int = 1) -> int:
    """The number every image side must be a multiple of (``patch_size`` 1: the convolutional stages only)."""
    return 4 * stem_stride * patch_size
