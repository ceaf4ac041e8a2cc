"""HDKD: hybrid data-efficient knowledge distillation for medical image classification.

The library behind the DVC pipeline: each ``pipeline/<stage>.py`` is a thin call into it.
"""
