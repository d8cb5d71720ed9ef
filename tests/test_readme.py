"""The README's example runs and does what it says."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_five_line_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    loss, grad, logits = namespace["loss"], namespace["grad"], namespace["logits"]
    assert grad is logits  # the gradient overwrote the logits, as the comment says
    assert np.isfinite(loss) and grad.shape == (8, 32000)
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-5)  # softmax minus a distribution
