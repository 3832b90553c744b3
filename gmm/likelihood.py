"""Pure functions for the mixture log density: no state, no torch.distributions.

Two ways of forming the Mahalanobis term, both for every family:

* the *difference* path (exact): z_nk = L_k^{-1} x_n - L_k^{-1} mu_k through one (N, D) x (D, K'D) matrix
  product with inverse Cholesky factors (scikit-learn's way), or broadcasting for diagonal covariances;
* the *quadratic* path (fast at large N): precompute features phi(x) = [x_i x_j (i <= j), x, 1] of the
  centred data once, then each pass is one (N, T) x (T, K) product. In float32 it loses precision when
  variances are tiny against the data's spread, so it is only chosen for large problems (see `fit`).

The log-sum-exp over components clamps its shifted arguments at about -80 (float32) / -700 (float64)
before `exp`: on CPU, `exp` below its underflow point is 30-100x slower, and the clamp changes the
result by less than rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .families import Covariance

LOG_2PI = math.log(2.0 * math.pi)


def exp_floor(dtype: torch.dtype) -> float:
    """Lowest shifted argument passed to exp in logsumexp (stays clear of denormals)."""
    return -80.0 if dtype in (torch.float32, torch.float16, torch.bfloat16) else -700.0


def _ones(n: int, like: Tensor) -> Tensor:
    # reductions over a short last axis are far slower on CPU than a product with a ones vector
    return torch.ones(n, dtype=like.dtype, device=like.device)


class _TrilInverse(torch.autograd.Function):
    """L^{-1} of lower-triangular (..., D, D) matrices, with the closed-form backward
    d(L^{-1}) = -L^{-1} dL L^{-1}, i.e. grad_L = -L^{-T} G L^{-T}; torch's generic backward of
    solve_triangular (for any right-hand side) costs several times more at small sizes."""

    @staticmethod
    def forward(ctx, tril: Tensor) -> Tensor:
        eye = torch.eye(tril.shape[-1], dtype=tril.dtype, device=tril.device).expand_as(tril)
        inv = torch.linalg.solve_triangular(tril, eye, upper=False)
        ctx.save_for_backward(inv)
        return inv

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (inv,) = ctx.saved_tensors
        inv_t = inv.transpose(-1, -2)
        return -(inv_t @ grad @ inv_t).tril()


def tril_inverse(tril: Tensor) -> Tensor:
    """(..., D, D) lower-triangular L -> L^{-1}, differentiable."""
    return _TrilInverse.apply(tril)


def logsumexp(joint: Tensor) -> Tensor:
    """(N, K) -> (N,) log sum_k exp(joint_nk), without the slow underflow path of exp on CPU."""
    peak = joint.detach().amax(-1, keepdim=True)
    shifted = (joint - peak).clamp(min=exp_floor(joint.dtype))
    return (shifted.exp() @ _ones(joint.shape[-1], joint)).log() + peak.squeeze(-1)


def component_log_prob(x: Tensor, means: Tensor, cov: Covariance) -> Tensor:
    """Per-component Gaussian log density, exact difference path.

    Args:
        x: (N, D) data.
        means: (K, D) component means.
        cov: the family's covariance (K' = K or 1).
    Returns:
        (N, K) log N(x_n | mu_k, Sigma_k).
    """
    return _mahalanobis(x, means, cov).mul(-0.5).sub(_log_norm(cov, means.shape[1]))


def _log_norm(cov: Covariance, num_dims: int) -> Tensor:
    """(K',) 0.5 log det(2 pi Sigma_k)."""
    return cov.half_log_det + 0.5 * num_dims * LOG_2PI


def augment(x: Tensor) -> Tensor:
    """(N, D) -> (N, D + 1) with a column of ones, so that a mean shift folds into one matrix product."""
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def _mahalanobis(x: Tensor, means: Tensor, cov: Covariance, augmented: bool = False) -> Tensor:
    """(N, K) squared Mahalanobis distances (x_n - mu_k)^T Sigma_k^{-1} (x_n - mu_k).

    With `augmented`, x is `augment(data)` and the mean shift rides in the same matrix product.
    """
    num_components, num_dims = means.shape
    num_samples = x.shape[0]
    if cov.scale_tril is not None:
        inv = tril_inverse(cov.scale_tril).expand(num_components, -1, -1)  # L_k^{-1} (K, D, D)
        # x_n @ B = L_k^{-1} x_n for all k at once: one (N, D) x (D, K D) product
        proj = inv.permute(2, 0, 1).reshape(num_dims, num_components * num_dims)
        shift = (inv @ means.unsqueeze(-1)).reshape(1, num_components * num_dims)  # L_k^{-1} mu_k
        if augmented:
            z = x @ torch.cat([proj, -shift])
        else:
            z = x @ proj - shift
        z = z.view(num_samples, num_components, num_dims)  # L_k^{-1} (x_n - mu_k)
    else:
        if augmented:
            x = x[:, :num_dims]
        z = (x.unsqueeze(1) - means) * cov.variances.rsqrt()  # (N, K, D)
    return z.square() @ _ones(num_dims, z)


def joint_log_prob(x: Tensor, logits: Tensor, means: Tensor, cov: Covariance, augmented: bool = False) -> Tensor:
    """(N, K) log pi_k + log N(x_n | mu_k, Sigma_k), exact path (`augmented`: x is `augment(data)`)."""
    bias = torch.log_softmax(logits, -1) - _log_norm(cov, means.shape[1])  # (K,)
    return torch.add(bias, _mahalanobis(x, means, cov, augmented), alpha=-0.5)


def log_prob(x: Tensor, logits: Tensor, means: Tensor, cov: Covariance) -> Tensor:
    """(N,) mixture log density of each sample, exact path."""
    return logsumexp(joint_log_prob(x, logits, means, cov))


# -- quadratic expansion ---------------------------------------------------------------------------------
def quadratic_features(x: Tensor, center: Tensor, cholesky: bool) -> Tensor:
    """(N, D) -> (N, T) features of the centred data: [quadratic terms, x - c, 1].

    The quadratic terms are x_i x_j for i <= j (T = D(D+1)/2 + D + 1) for full matrices, or x_i^2
    (T = 2D + 1) for diagonal covariances.
    """
    xc = x - center
    if cholesky:  # row i of the upper triangle: x_i * x_j for j >= i (a loop over D, not over N or K)
        quad = torch.cat([xc[:, i : i + 1] * xc[:, i:] for i in range(x.shape[1])], dim=1)
    else:
        quad = xc.square()
    return torch.cat([quad, xc, torch.ones_like(xc[:, :1])], dim=1)


def quadratic_weights(logits: Tensor, means: Tensor, cov: Covariance, center: Tensor) -> Tensor:
    """(T, K) weights such that features @ weights = joint_log_prob (see `quadratic_features`)."""
    num_components, num_dims = means.shape
    mc = means - center  # (K, D)
    if cov.scale_tril is not None:
        inv = tril_inverse(cov.scale_tril)  # L^{-1} (K', D, D)
        precision = (inv.transpose(-1, -2) @ inv).expand(num_components, -1, -1)  # (K, D, D)
        rows, cols = torch.triu_indices(num_dims, num_dims, device=means.device)
        off = torch.where(rows == cols, -0.5, -1.0).to(means.dtype)
        w_quad = precision[:, rows, cols] * off  # (K, D(D+1)/2)
        pm = (precision @ mc.unsqueeze(-1)).squeeze(-1)  # (K, D) Lambda_k (mu_k - c)
    else:
        precision = cov.variances.reciprocal().expand(num_components, -1)  # (K, D)
        w_quad = -0.5 * precision
        pm = precision * mc
    bias = torch.log_softmax(logits, -1) - _log_norm(cov, num_dims) - 0.5 * (pm * mc).sum(-1)
    return torch.cat([w_quad, pm, bias.unsqueeze(-1)], dim=1).T
