"""Quality measures of a fit against the truth that generated its data (numpy/scipy; no MLflow).

recovery_error(fitted_means, true_means)   # mean distance after Hungarian matching
adjusted_rand_index(true_labels, predicted)  # 1 = same partition, ~0 = chance
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def recovery_error(fitted_means, true_means) -> float:
    """Mean Euclidean distance between fitted and true means, matched one to one by the Hungarian algorithm.

    Args:
        fitted_means: (K_fit, D).
        true_means: (K_true, D). With K_fit != K_true only min(K_fit, K_true) pairs are matched.

    Returns:
        The mean distance of the matched pairs (0 when every true mean is recovered exactly).
    """
    a, b = _as_array(fitted_means), _as_array(true_means)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"means must be (K, D) arrays of the same D; got shapes {a.shape} and {b.shape}")
    cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)  # (K_fit, K_true)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _comb2(n: np.ndarray) -> np.ndarray:
    return n * (n - 1) / 2.0


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Adjusted Rand index of two labelings of the same points (Hubert and Arabie, 1985).

    1.0 for identical partitions (up to renaming), about 0 for independent ones; equals scikit-learn's
    `adjusted_rand_score`.
    """
    t, p = np.asarray(_as_array(labels_true), dtype=np.int64), np.asarray(_as_array(labels_pred), dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"labels must be two 1-D arrays of the same length; got shapes {t.shape} and {p.shape}")
    n = t.size
    if n < 2:
        return 1.0
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1))
    np.add.at(table, (ti, pi), 1.0)
    index = _comb2(table).sum()
    rows, cols = _comb2(table.sum(1)).sum(), _comb2(table.sum(0)).sum()
    expected = rows * cols / _comb2(np.float64(n))
    maximum = (rows + cols) / 2.0
    if maximum == expected:  # both partitions trivial (one cluster each, or all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))
