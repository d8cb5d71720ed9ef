"""tests/seeds.py: every run draws fresh inputs, and a failure's seed replays them."""

import re

import numpy as np

from tests.seeds import fresh_rng


def test_a_printed_seed_replays_the_inputs(monkeypatch, capsys):
    monkeypatch.delenv("NBXENT_SEED", raising=False)
    first = fresh_rng().standard_normal(8)
    seed = int(re.search(r"NBXENT_SEED=(\d+)", capsys.readouterr().out)[1])
    assert not np.array_equal(fresh_rng().standard_normal(8), first)  # a new seed each call
    monkeypatch.setenv("NBXENT_SEED", str(seed))
    np.testing.assert_array_equal(fresh_rng().standard_normal(8), first)
