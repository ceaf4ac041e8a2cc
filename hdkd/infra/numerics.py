"""Reproducible CPU numerics: the same commit, params and seeds give bit-identical weights on any
x86-64 CPU with AVX2 (``train.reproducible``, on by default; no effect on CUDA).

PyTorch's CPU kernels choose their instruction set, blocking and work split per machine, and each
choice changes the order of floating-point sums. The mode pins every choice that does:

* ATen's own vector kernels run their AVX2 variants even on AVX-512 CPUs (``ATEN_CPU_CAPABILITY``):
  the vector width fixes the order of reductions, and of random-number transforms at initialisation.
* oneDNN and NNPACK are switched off: their convolutions pick kernels and blockings by ISA and cache
  size with no cross-CPU guarantee; ATen's own convolution (im2col + BLAS GEMM) runs instead.
* MKL's GEMM runs its conditional-numerical-reproducibility branch ``COMPATIBLE``: MKL documents it
  as identical on Intel and non-Intel CPUs (its ``AVX2`` branch holds on Intel CPUs only).
* One intra-op thread: ATen's parallel reductions and MKL split work by thread count, so results
  differ between machines with different core counts unless the count is fixed; 1 is the only count
  that does not oversubscribe some machine.

The environment part must be in place before torch loads; ``pipeline/__init__.py`` applies it, so
every stage gets it however it is started (``python -m pipeline.<stage>``, ``dvc repro``,
``dvc exp run``, ``torchrun -m``). The runtime part is applied by the training and evaluation code.
This module imports torch only inside the functions that need it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

REPRODUCIBLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
THREADS = 1  # set at run time (torch.set_num_threads sets OpenMP's and MKL's count)
# Variables that cap an instruction set (set by the mode, or by a user or a test emulating another CPU).
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")

_library_defaults: dict[str, Any] = {}


class NumericsError(RuntimeError):
    """The reproducible mode was asked for but cannot hold in this process."""


def reproducible_in(params_file: str | os.PathLike = "params.yaml") -> bool:
    """``train.reproducible`` of a params file, read with yaml alone (before torch loads).

    The mode is the default: a missing key or file means on. A file that is not valid YAML also
    means on here; the stage's own validation reports it a moment later with the details.
    """
    import yaml

    try:
        raw = yaml.safe_load(Path(params_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return True
    train = raw.get("train") if isinstance(raw, dict) else None
    return not (isinstance(train, dict) and train.get("reproducible") is False)


def apply_env() -> bool:
    """Set ``REPRODUCIBLE_ENV`` if torch has not loaded yet; ``False`` if it is too late to take effect.

    Setting it after torch loaded would leave ATen and MKL half-configured, so then nothing changes
    and ``apply_runtime(True)`` refuses to claim the mode.
    """
    if env_in_place():
        return True
    if "torch" in sys.modules:
        return False
    os.environ.update(REPRODUCIBLE_ENV)
    return True


def env_in_place() -> bool:
    return all(os.environ.get(k) == v for k, v in REPRODUCIBLE_ENV.items())


def apply_runtime(on: bool) -> None:
    """Switch the mode's runtime part on (reproducible) or back to the library defaults (fast).

    Raises :class:`NumericsError` when ``on`` but the environment part did not reach torch (this
    process imported torch before ``apply_env``).
    """
    import torch

    if on:
        capability = torch.backends.cpu.get_cpu_capability()
        if not env_in_place() or capability != "AVX2":
            raise NumericsError(
                f"train.reproducible is true but torch was loaded without the reproducible environment "
                f"{REPRODUCIBLE_ENV} (ATen capability {capability}); run stages as `python -m pipeline.<stage>` "
                f"(pipeline/__init__.py sets it from params.yaml), call hdkd.infra.numerics.apply_env() before "
                f"importing torch, or set train.reproducible: false. The mode needs a CPU with AVX2.")
    nnpack = torch.backends.nnpack.set_flags(False)[0]
    if not _library_defaults:  # what "off" restores in a process that switches back and forth (tests)
        _library_defaults.update(mkldnn=torch.backends.mkldnn.enabled, nnpack=nnpack, threads=torch.get_num_threads())
    torch.backends.mkldnn.enabled = _library_defaults["mkldnn"] and not on
    torch.backends.nnpack.set_flags(_library_defaults["nnpack"] and not on)
    torch.set_num_threads(THREADS if on else _library_defaults["threads"])


def library_versions() -> dict[str, str]:
    """MKL and oneDNN versions as torch's build reports them."""
    import torch

    config = torch.__config__.show()
    patterns = {"mkl": r"Math Kernel Library Version ([\w.]+)", "onednn": r"MKL-DNN v([\w.]+)"}
    return {key: m.group(1) for key, pattern in patterns.items() if (m := re.search(pattern, config))}


def numerics_versions() -> dict[str, str]:
    """The versions that decide the numbers: torch, numpy, and the MKL and oneDNN torch was built with.

    Recorded in every MLflow run and in the results bundle; the reports check names any that differ.
    """
    import numpy
    import torch

    return {"torch": torch.__version__, "numpy": numpy.__version__, **library_versions()}


def is_reproducible() -> bool:
    """Whether this process runs under the reproducible numerics mode."""
    import torch

    return env_in_place() and not torch.backends.mkldnn.enabled and torch.get_num_threads() == THREADS


def environment_facts() -> dict[str, Any]:
    """What decides the CPU numerics of this process (for run records)."""
    import torch

    return {
        "reproducible": is_reproducible(),
        **numerics_versions(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
        "mkldnn": torch.backends.mkldnn.enabled,
        "threads": torch.get_num_threads(),
    }
