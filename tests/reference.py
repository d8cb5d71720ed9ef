"""The plain float64 NumPy reference every kernel is checked against.

Written for clarity, not speed: one row at a time, the formulas as PyTorch documents them.
"""

from __future__ import annotations

import numpy as np


def capped(x: np.ndarray, softcap: float | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x if softcap is None else softcap * np.tanh(x / softcap)


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Stable float64 logsumexp over the last axis; -inf for all -inf rows, +inf with a +inf."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    finite_m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.sum(np.exp(x - finite_m), axis=-1)) + finite_m[..., 0]
    return np.where(np.isinf(m[..., 0]) & ~np.isnan(out), m[..., 0], out)


def cross_entropy(
    logits,
    targets,
    *,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    weight=None,
    z_loss=0.0,
    softcap=None,
    grad_output=1.0,
):
    """(loss, grad) in float64, with PyTorch's F.cross_entropy semantics plus z-loss and softcap."""
    logits = np.asarray(logits, dtype=np.float64)
    v = logits.shape[-1]
    x = logits.reshape(-1, v)
    t = np.asarray(targets).reshape(-1).astype(np.int64)
    w = np.ones(v) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = label_smoothing
    n = x.shape[0]
    losses = np.zeros(n)
    grads = np.zeros_like(x)
    total_weight = 0.0
    with np.errstate(all="ignore"):
        for i in range(n):
            if t[i] == ignore_index:
                continue
            xc = capped(x[i], softcap)
            lse = logsumexp(xc)
            logp = xc - lse
            p = np.exp(logp)
            wt = w[t[i]]
            total_weight += wt
            losses[i] = (1 - eps) * wt * -logp[t[i]] + z_loss * wt * lse**2
            if eps > 0:  # PyTorch adds the smoothing term only when smoothing (0 * inf would be NaN)
                losses[i] += eps / v * np.sum(w * -logp)
            onehot = np.zeros(v)
            onehot[t[i]] = 1.0
            g = (1 - eps) * wt * (p - onehot) + 2 * z_loss * wt * lse * p
            if eps > 0:  # as for the loss: the weights of other classes enter with smoothing only
                g += eps / v * (np.sum(w) * p - w)
            if softcap is not None:
                g = g * (1 - (xc / softcap) ** 2)
            grads[i] = g
        go = np.asarray(grad_output, dtype=np.float64)
        if reduction == "none":
            loss = losses.reshape(np.shape(targets))
            grads *= np.broadcast_to(go, np.shape(targets)).reshape(-1, 1)
        elif reduction == "sum":
            loss = losses.sum()
            grads *= go
        else:
            loss = losses.sum() / total_weight
            kept = t != ignore_index  # ignored rows keep a zero gradient, even when all are ignored
            grads[kept] *= go / total_weight
    return loss, grads.reshape(logits.shape)


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.exp(x - logsumexp(x)[..., None])


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return x - logsumexp(x)[..., None]
