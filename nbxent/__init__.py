"""nbxent: fused, numerically stable softmax cross-entropy and its gradient, compiled by Numba
for CPUs (``@njit(parallel=True)``) and NVIDIA GPUs (``@cuda.jit``).

>>> import numpy as np, nbxent as nx
>>> logits = np.log(np.array([[0.7, 0.3]], dtype=np.float32))
>>> print(round(float(nx.cross_entropy(logits, np.array([0]))), 3))
0.357
"""

from .api import (
    cross_entropy,
    cross_entropy_backward,
    cross_entropy_with_grad,
    log_softmax,
    logsumexp,
    softmax,
)
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_with_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "log_softmax",
    "logsumexp",
    "softmax",
]
