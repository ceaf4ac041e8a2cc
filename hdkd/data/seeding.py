"""Seeds derived from several integers (dataset seed, epoch, sample index, ...)."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A well-mixed 64-bit seed for the tuple ``keys``: distinct tuples give unrelated streams.

    Used wherever randomness must depend only on *what* is drawn (this sample, this epoch), not
    on the order or the process in which things run.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])
