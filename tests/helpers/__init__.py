"""Helpers shared by the tests: data, params, fits, scratch pipelines, Ray faults, a torchrun step."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
