import json
import os
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "official-small"


@pytest.fixture(scope="session")
def reference():
    """The official implementation's weights, inputs/outputs and loss values (../shared/reference)."""
    if not (REFERENCE / "meta.json").is_file():
        reason = f"official reference outputs not found at {REFERENCE} (expected ../shared/reference beside the repo)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return {
        "meta": json.loads((REFERENCE / "meta.json").read_text()),
        "weights": torch.load(REFERENCE / "weights.pt", weights_only=True),
        "io": torch.load(REFERENCE / "io.pt", weights_only=True),
        "dir": REFERENCE,
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
