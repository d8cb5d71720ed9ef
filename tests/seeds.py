"""Fresh random inputs whose seed a failing test shows.

Every run draws new inputs (the project tests on fresh random data, not one fixed sample);
each generator's seed is printed, which pytest shows beside a failure, and
``NBXENT_SEED=<seed> python -m pytest <test id>`` replays it (every generator of that run
then starts from that seed).
"""

import os

import numpy as np


def fresh_rng() -> np.random.Generator:
    """A NumPy generator with a new seed, or ``NBXENT_SEED``'s when it is set."""
    seed = int(os.environ.get("NBXENT_SEED") or np.random.SeedSequence().entropy)
    print(f"random seed: {seed} (replay: NBXENT_SEED={seed})")
    return np.random.default_rng(seed)
