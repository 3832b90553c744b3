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

import functools
import math

import torch
from torch import Tensor

from .families import Covariance, Family, tril_from_raw

LOG_2PI = math.log(2.0 * math.pi)


def exp_floor(dtype: torch.dtype) -> float:
    """Lowest shifted argument passed to exp in logsumexp (stays clear of denormals)."""
    return -80.0 if dtype in (torch.float32, torch.float16, torch.bfloat16) else -700.0


@functools.lru_cache(maxsize=64)  # bounded: a long-lived process meets many shapes, dtypes and devices
def _make_constant(kind: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small read-only ones vector or identity, made once per kind, size, dtype and device."""
    make = torch.ones if kind == "ones" else torch.eye
    return make(n, dtype=dtype, device=device)


def _constant(kind: str, n: int, like: Tensor) -> Tensor:
    return _make_constant(kind, n, like.dtype, like.device)


def _ones(n: int, like: Tensor) -> Tensor:
    # reductions over a short last axis are far slower on CPU than a product with a ones vector
    return _constant("ones", n, like)


def _eye(n: int, like: Tensor) -> Tensor:
    return _constant("eye", n, like)


class _TrilInverse(torch.autograd.Function):
    """L^{-1} of lower-triangular (..., D, D) matrices, with the closed-form backward
    d(L^{-1}) = -L^{-1} dL L^{-1}, i.e. grad_L = -L^{-T} G L^{-T}; torch's generic backward of
    solve_triangular (for any right-hand side) costs several times more at small sizes."""

    @staticmethod
    def forward(ctx, tril: Tensor) -> Tensor:
        eye = _eye(tril.shape[-1], tril).expand_as(tril)
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


class _LogSumExp(torch.autograd.Function):
    """log sum_k exp(joint_nk) over the last axis as one autograd node: the backward is grad_n * r_nk with
    the softmax r saved by the forward (the gradient of the clamp below exp_floor, zero, is not applied:
    it changes r by less than exp(exp_floor))."""

    @staticmethod
    def forward(ctx, joint: Tensor) -> Tensor:
        peak = joint.amax(-1, keepdim=True)
        e = (joint - peak).clamp_(min=exp_floor(joint.dtype)).exp_()  # (N, K)
        total = e @ _ones(joint.shape[-1], joint)  # (N,)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(e.div_(total.unsqueeze(-1)))  # responsibilities
        return total.log_().add_(peak.squeeze(-1))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (resp,) = ctx.saved_tensors
        return resp * grad.unsqueeze(-1)


class _SquaredNorm(torch.autograd.Function):
    """(..., D) -> (...) sum_d z_d^2. Forward as a product with a ones vector (a reduction over a short last
    axis is far slower on CPU), backward 2 z grad in one broadcast (matmul's generic backward costs 5x more)."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(z)
        return (z * z) @ _ones(z.shape[-1], z)  # z * z: aten's square (pow) is several times slower here

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return z * (2.0 * grad).unsqueeze(-1)


def _cholesky_z(x: Tensor, tril: Tensor, means: Tensor, augmented: bool) -> tuple[Tensor, Tensor]:
    """(z (N, K, D), W = L^{-1} (K', D, D)): z_nk = W_k (x_n - mu_k), the difference taken first.

    The difference comes before the product so that z is exactly 0 where x_n == mu_k, as it is on the diagonal
    families' path. The product form W_k x_n - W_k mu_k (one (N, D) x (D, K D) product, scikit-learn's way)
    is faster but leaves a rounding residue of eps |W_k x_n| there, which gives a component sitting on a
    point mass a mean gradient of that size; Adam normalizes it to a full learning-rate step, so the mean
    jitters around the point and the covariance cannot shrink onto it. That made the Cholesky families
    immune to point-mass collapse while the diagonal ones collapsed: an artefact of the arithmetic that
    this harness, whose subject is collapse, must not have.
    """
    num_components, num_dims = means.shape
    eye = _eye(num_dims, tril).expand_as(tril)
    inv = torch.linalg.solve_triangular(tril, eye, upper=False)  # (K', D, D)
    inv_k = inv.expand(num_components, -1, -1)
    if augmented:
        x = x[:, :num_dims]
    return whiten(x, inv_k, means), inv


def whiten(x: Tensor, inv: Tensor, means: Tensor) -> Tensor:
    """(N, K, D) z_nk = W_k (x_n - mu_k) for x (N, D), W (K, D, D) and means (K, D): the difference first, so
    z is exactly 0 where x_n == mu_k (see `_cholesky_z`). Shared by the autograd and the analytic paths."""
    diff = x.unsqueeze(0) - means.unsqueeze(1)  # (K, N, D)
    return torch.bmm(diff, inv.transpose(-1, -2)).transpose(0, 1).contiguous()


def _cholesky_q_backward(weight: Tensor, x: Tensor, inv: Tensor, means: Tensor, z: Tensor, augmented: bool, needs):
    """Backward of z_nk = W_k (x_n - mu_k) given dloss/dz_nk = G_nk = weight_nk z_nk (weight (N, K): 2 dloss/dq).

    Returns (g_x, M, g_means) with M = W^T dW W^T, so that dL = -tril(M) (d(L^{-1}) = -L^{-1} dL L^{-1}); the
    callers fold that sign where it is cheapest. See _CholeskyMahalanobis for the formulas.
    """
    num_components, num_dims = means.shape
    num_samples = x.shape[0]
    g_z = (z * weight.unsqueeze(-1)).view(num_samples, num_components * num_dims)  # (N, K D)
    inv_k = inv.expand(num_components, -1, -1)
    # (X^T G)[j, k D + i] = sum_n x_nj G_nki (x.T @ g_z is far faster than g_z.T @ x[:, :D] here); with
    # augmented data (a ones column) its last row is s_k = sum_n G_nk for free
    xg = x.T @ g_z if needs[1] or augmented else None
    s = (xg[num_dims] if augmented else _ones(num_samples, g_z) @ g_z).view(num_components, num_dims)  # (K, D)
    g_x = m = g_means = None
    if needs[0]:  # rarely wanted: dz_nk/dx_n = W_k (the ones column of augmented data does not enter z)
        proj = inv_k.permute(2, 0, 1).reshape(num_dims, num_components * num_dims)
        g_x = g_z @ proj.T
        if augmented:
            g_x = torch.cat([g_x, torch.zeros_like(g_x[:, :1])], dim=1)
    if needs[1]:
        # dW_k = sum_n G_nk x_n^T - s_k mu_k^T
        xg_k = xg[:num_dims].view(num_dims, num_components, num_dims).permute(1, 2, 0)  # (K, D, D)
        g_inv = torch.baddbmm(xg_k, s.unsqueeze(-1), means.unsqueeze(-2), alpha=-1)
        if inv.shape[0] != num_components:  # one L shared by all components
            g_inv = g_inv.sum(0, keepdim=True)
        inv_t = inv.transpose(-1, -2)
        m = inv_t @ g_inv @ inv_t
    if needs[2]:
        g_means = (inv_k.transpose(-1, -2) @ s.unsqueeze(-1)).squeeze(-1).neg_()
    return g_x, m, g_means


class _CholeskyMahalanobis(torch.autograd.Function):
    """q_nk = |z_nk|^2 with z_nk = W_k (x_n - mu_k), W_k = L_k^{-1}, as one autograd node.

    Forward: W by a triangular solve, then z from the differences x_n - mu_k (exactly 0 at x_n == mu_k, see
    `_cholesky_z`) by one batched product; `augmented` data (x = `augment(data)`) drops its ones column.
    Backward, with G_nk = dq/dz_nk = 2 g_nk z_nk and s_k = sum_n G_nk:

        dW_k = sum_n G_nk (x_n - mu_k)^T = G_k^T X - s_k mu_k^T,   dmu_k = -W_k^T s_k,
        dL_k = -tril(W_k^T dW_k W_k^T)                             (d(L^{-1}) = -L^{-1} dL L^{-1}),

    summed over k for a shared L. The same arithmetic autograd does through the separate ops, in one node
    instead of about fifteen (at small N the per-node cost is most of a step).
    """

    @staticmethod
    def forward(ctx, x: Tensor, tril: Tensor, means: Tensor, augmented: bool) -> Tensor:
        z, inv = _cholesky_z(x, tril, means, augmented)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(x, inv, means, z)
            ctx.augmented = augmented
        return (z * z) @ _ones(means.shape[1], z)  # (N, K)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, inv, means, z = ctx.saved_tensors
        g_x, m, g_means = _cholesky_q_backward(2.0 * grad, x, inv, means, z, ctx.augmented, ctx.needs_input_grad)
        return g_x, (m.tril().neg_() if m is not None else None), g_means, None


class _CholeskyMixtureNLL(torch.autograd.Function):
    """scale * sum_n logsumexp_k(log_softmax(l)_k - h_k - D/2 log 2 pi - q_nk / 2) for the Cholesky families,
    from their raw parameter (`gmm.families`: L = strict lower triangle of raw + diag(exp(diag raw)),
    h_k = 1/2 log det Sigma_k = sum diag raw_k), as one autograd node.

    The fit's loss (scale = -1/N): covariance parameterization, weights, normalization, joint log density,
    log-sum-exp over components and sum over samples in one node instead of about fifteen (at small N the
    per-node cost of autograd is most of a step). Backward, with the responsibilities r_nk saved by the
    forward, g = scale * grad and b_k = g sum_n r_nk (the gradient of the bias log pi_k - h_k - ...):
    dl = b - pi sum_k b_k, dh = -b (summed over k for a shared covariance), dq_nk = -g r_nk / 2 through the
    Mahalanobis backward (`_CholeskyMahalanobis`), then dL, dh -> draw (`families.raw_grad_from_tril`).
    """

    @staticmethod
    def forward(ctx, x, raw, means, logits, scale: float, augmented: bool) -> Tensor:
        num_dims = means.shape[1]
        tril, diag = tril_from_raw(raw)
        log_w = torch.log_softmax(logits, -1)
        bias = log_w - raw.diagonal(dim1=-2, dim2=-1).sum(-1) - 0.5 * num_dims * LOG_2PI  # (K,)
        z, inv = _cholesky_z(x, tril, means, augmented)
        joint = torch.add(bias, (z * z) @ _ones(num_dims, z), alpha=-0.5)  # (N, K)
        peak = joint.amax(-1, keepdim=True)
        e = joint.sub_(peak).clamp_(min=exp_floor(joint.dtype)).exp_()  # (N, K)
        total = e @ _ones(e.shape[-1], e)  # (N,)
        lse = total.log().add_(peak.squeeze(-1))
        if any(ctx.needs_input_grad[:4]):
            ctx.save_for_backward(x, means)
            # intermediates live on ctx directly (no double backward here): packing them as saved
            # variables costs more than the arithmetic at small N
            ctx.inv, ctx.z, ctx.resp, ctx.log_w, ctx.diag = inv, z, e.div_(total.unsqueeze(-1)), log_w, diag
            ctx.scale, ctx.augmented, ctx.shared = scale, augmented, raw.shape[0] != means.shape[0]
        return lse.sum() * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, means = ctx.saved_tensors
        inv, z, resp, log_w, diag = ctx.inv, ctx.z, ctx.resp, ctx.log_w, ctx.diag
        needs = ctx.needs_input_grad
        g = grad * ctx.scale
        # dloss/dq_nk = -g r_nk / 2, so G_nk = 2 dloss/dq_nk z_nk = -g r_nk z_nk
        g_x, m, g_means = _cholesky_q_backward(resp * g.neg(), x, inv, means, z, ctx.augmented, needs)
        g_bias = (_ones(x.shape[0], resp) @ resp) * g  # (K,)
        g_logits = torch.addcmul(g_bias, log_w.exp(), g_bias.sum(), value=-1) if needs[3] else None
        g_raw = None
        if needs[1]:
            # families.raw_grad_from_tril(-tril(M), -g_h, diag) with the signs folded in: M's part above the
            # diagonal is dropped by tril, draw_ii = -(M_ii L_ii + g_h)
            g_h = g_bias.sum(0, keepdim=True) if ctx.shared else g_bias  # = -d(half_log_det)
            g_raw = m.tril(-1).neg_()
            g_diag = torch.addcmul(g_h.unsqueeze(-1), m.diagonal(dim1=-2, dim2=-1), diag)
            g_raw.diagonal(dim1=-2, dim2=-1).copy_(g_diag.neg_())
        return g_x, g_raw, g_means, g_logits, None, None


def mixture_nll_sum(
    x: Tensor, logits: Tensor, means: Tensor, raw: Tensor, family: Family, scale: float, augmented: bool = False
) -> Tensor:
    """scale * sum_n log p(x_n) of a mixture given its raw covariance parameter: the fit's loss with
    scale = -1/N (0-d tensor), exact difference path.

    Cholesky families go through one fused autograd node (`_CholeskyMixtureNLL`); the others through
    `family.covariance` and the population's node (`_BatchedMixtureNLL`) with one member. Through
    `joint_log_prob` and `logsumexp` instead, their backward multiplied the responsibilities by 1/N first, and
    far points' products fell into float32's denormals: a diagonal step at N = 1000 was about 15% slower.
    """
    if family.cholesky:
        return _CholeskyMixtureNLL.apply(x, raw, means, logits, scale, augmented)
    xt = (x[:, : means.shape[1]] if augmented else x).T.unsqueeze(0)  # (1, D, N)
    cov = family.covariance(raw.unsqueeze(0))  # a population of one
    return batched_mixture_nll(xt, logits.unsqueeze(0), means.unsqueeze(0), cov, scale)[0]


def logsumexp(joint: Tensor) -> Tensor:
    """(N, K) -> (N,) log sum_k exp(joint_nk), without the slow underflow path of exp on CPU."""
    return _LogSumExp.apply(joint)


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
    num_dims = means.shape[1]
    if cov.scale_tril is not None:
        return _CholeskyMahalanobis.apply(x, cov.scale_tril, means, augmented)
    if augmented:
        x = x[:, :num_dims]
    z = (x.unsqueeze(1) - means) * cov.variances.rsqrt()  # (N, K, D)
    return _SquaredNorm.apply(z)


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


# -- populations: B independent mixtures at once -----------------------------------------------------------
def batched_joint_log_prob(x: Tensor, logits: Tensor, means: Tensor, cov: Covariance) -> Tensor:
    """(B, N, K) log pi_bk + log N(x_bn | mu_bk, Sigma_bk) for B mixtures of one family, K and D.

    Args:
        x: (B, N, D) one data set per mixture, or (1, N, D) shared by all.
        logits: (B, K) weight logits; means: (B, K, D).
        cov: the family's covariance of a batched raw tensor: scale_tril (B, K', D, D) or variances (B, K', D),
            half_log_det (B, K'), with K' = K or 1.

    The difference x_n - mu_k comes first, as in `whiten`, so z is exactly 0 at x_n == mu_k (a component on a
    point mass gets an exactly zero mean gradient). Every op is batched over B: a step over B small mixtures
    costs about the per-op overhead of one (the small-problem regime of PERFORMANCE.md).
    """
    num_dims = means.shape[-1]
    diff = x.unsqueeze(1) - means.unsqueeze(2)  # (B, K, N, D)
    if cov.scale_tril is not None:
        inv = tril_inverse(cov.scale_tril)  # (B, K', D, D)
        z = torch.matmul(diff, inv.transpose(-1, -2))  # (B, K, N, D); K' = 1 broadcasts
    else:
        z = diff * cov.variances.rsqrt().unsqueeze(2)  # (B, K', 1, D) broadcast over N
    q = _SquaredNorm.apply(z)  # (B, K, N)
    bias = torch.log_softmax(logits, -1) - cov.half_log_det - 0.5 * num_dims * LOG_2PI  # (B, K)
    return torch.add(bias.unsqueeze(-1), q, alpha=-0.5).transpose(1, 2)  # (B, N, K)


def batched_log_prob(x: Tensor, logits: Tensor, means: Tensor, cov: Covariance) -> Tensor:
    """(B, N) mixture log density of each sample under each of B mixtures (see `batched_joint_log_prob`)."""
    return logsumexp(batched_joint_log_prob(x, logits, means, cov))


class Workspace:
    """Buffers for the large intermediates of `batched_mixture_nll`, kept from one step to the next.

    A population step forms several (B, K, D, n) and (B, K, n) tensors, each about a megabyte at B = 32. Fresh
    ones every step are fresh pages for the allocator (glibc returns freed blocks that large to the system), and
    touching those pages cost about a fifth of the step (bench.population). A step writes into the same buffers
    instead (one set per chunk shape). Not shared between threads; a second forward through the same workspace
    before the first one's backward makes that backward raise (autograd's in-place check on saved tensors), never
    give a wrong gradient. Its backward writes into the saved buffers, so a graph through it goes backward once.
    """

    backward_once = True

    def __init__(self):
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialized buffer of that shape, dtype and device, the same one at every call."""
        key = (name, shape, dtype, device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf


class _Fresh:
    """A workspace that allocates at every call (one-off evaluations), and leaves saved tensors alone."""

    backward_once = False

    @staticmethod
    def get(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=device)


class _BatchedMixtureNLL(torch.autograd.Function):
    """(B,) scale * sum_n logsumexp_k(joint_bkn) for B mixtures, as one autograd node (the per-op overhead of
    about twenty separate nodes, and autograd's generic broadcasting backward, cost most of a batched step).

    Inputs: xt (B or 1, D, N), the data transposed so that N is the innermost, contiguous axis of every large
    intermediate (with D innermost, each broadcast op over (B, K, N, D) ran 3-5x slower at D = 2); means
    (B, K, D); logits (B, K); `whitener` W = L^{-1} (B, K', D, D) for the Cholesky families, or 1/std
    (B, K', D) for the diagonal ones; half_log_det (B, K'); `work` the `Workspace` the large intermediates
    are written into. With d_kn = x_n - mu_k (the difference first: z is exactly 0 at x_n == mu_k),
    z_kn = W_k d_kn (or d_kn / std_k), joint_kn = log_softmax(l)_k - h_k - D/2 log 2 pi - |z_kn|^2 / 2 and r the
    responsibilities, the backward with a_kn = g scale r_kn is

        dl = sum_n a - pi sum_k sum_n a,   dh = -sum_n a,   dz_kn = -a_kn z_kn,
        dW_k = sum_n dz_kn d_kn^T  (or d(1/std)_k = sum_n dz_kn * d_kn),   dmu_k = -W_k^T sum_n dz_kn,

    each summed over k for a shared covariance (K' = 1).
    """

    @staticmethod
    def forward(ctx, xt, means, logits, whitener, half_log_det, scale: float, work):
        num_members, num_components, num_dims = means.shape
        big = (num_members, num_components, num_dims, xt.shape[-1])
        kind = (torch.promote_types(xt.dtype, means.dtype), means.device)  # float64 data lifts float32 parameters
        diff = torch.sub(xt.unsqueeze(1), means.unsqueeze(-1), out=work.get("diff", big, *kind))  # (B, K, D, N)
        cholesky = whitener.ndim == 4
        z = work.get("z", big, *kind)
        if cholesky:
            torch.matmul(whitener, diff, out=z)  # K' = 1 broadcasts
        else:
            torch.mul(diff, whitener.unsqueeze(-1), out=z)
        joint = _squared_rows(z, work.get("joint", big[:2] + big[3:], *kind))  # (B, K, N): q, then the joint
        log_w = torch.log_softmax(logits, -1)
        bias = log_w - half_log_det - 0.5 * num_dims * LOG_2PI  # (B, K)
        torch.add(bias.unsqueeze(-1), joint, alpha=-0.5, out=joint)
        peak = joint.amax(1, keepdim=True)  # (B, 1, N)
        e = joint.sub_(peak).clamp_(min=exp_floor(joint.dtype)).exp_()
        total = e.sum(1, keepdim=True)  # (B, 1, N)
        lse = total.log().add_(peak).squeeze(1)  # (B, N)
        if any(ctx.needs_input_grad[:5]):
            # the responsibilities e / total are formed in the backward, together with its scale (one pass)
            ctx.save_for_backward(diff, z, e, total, log_w, whitener)
            ctx.scale, ctx.cholesky, ctx.work, ctx.data_members = scale, cholesky, work, xt.shape[0]
        return lse.sum(-1) * scale  # (B,)

    @staticmethod
    def backward(ctx, grad: Tensor):
        diff, z, e, total, log_w, whitener = ctx.saved_tensors
        # the big products take the responsibilities r >= exp(exp_floor) / K, and the member's factor
        # c = -g scale (1/N for the fit's loss) is applied to their sums over n: r c, and its products with z, fell
        # below float32's smallest normal number for far points, and every op on such denormals ran 3-8x slower
        # a Workspace's graph goes backward once (a fit's step): its products overwrite the saved buffers, which
        # keeps the working set small (10% of the step at B = 32); fresh tensors otherwise, so that a retained
        # graph (gradcheck, per-member autograd.grad) can go backward again
        once = ctx.work.backward_once
        c = grad * -ctx.scale  # (B,)
        r = torch.div(e, total, out=e if once else None)  # (B, K, N)
        g_bias = r.sum(-1).mul_(c.unsqueeze(-1)).neg_()  # (B, K)
        g_logits = g_bias - log_w.exp() * g_bias.sum(-1, keepdim=True)
        shared = whitener.shape[1] != z.shape[1]
        g_h = -(g_bias.sum(-1, keepdim=True) if shared else g_bias)
        dz = torch.mul(z, r.unsqueeze(2), out=z if once else None)  # (B, K, D, N): dloss/dz / c
        c3 = c.view(-1, 1, 1)
        s = dz.sum(-1).mul_(c3)  # (B, K, D) sum over n of dloss/dz
        g_x = None
        if ctx.needs_input_grad[0]:  # rarely wanted: dloss/dx_n = sum_k W_k^T dloss/dz_kn
            dd = torch.matmul(whitener.transpose(-1, -2), dz) if ctx.cholesky else dz * whitener.unsqueeze(-1)
            g_x = dd.sum(1).mul_(c3)  # (B, D, N)
            if ctx.data_members != g_x.shape[0]:  # data shared by every member
                g_x = g_x.sum(0, keepdim=True)
        if ctx.cholesky:
            g_w = torch.matmul(dz, diff.transpose(-1, -2)).mul_(c3.unsqueeze(-1))  # (B, K, D, D)
            g_means = -(s.unsqueeze(-2) @ whitener).squeeze(-2)  # -W^T s
        else:
            g_w = dz.mul_(diff).sum(-1).mul_(c3)  # (B, K, D)
            g_means = -s * whitener
        if shared:
            g_w = g_w.sum(1, keepdim=True)
        return g_x, g_means, g_logits, g_w, g_h, None, None


def _squared_rows(z: Tensor, out: Tensor) -> Tensor:
    """(B, K, D, N) -> (B, K, N) sum_d z_d^2, written into `out`: for small D one multiply-add per axis over long
    rows (at D = 2 about half the time of (z * z).sum(2), which forms a (B, K, D, N) square first)."""
    if z.shape[2] > 8:
        return torch.sum(z * z, 2, out=out)
    torch.mul(z[:, :, 0], z[:, :, 0], out=out)
    for d in range(1, z.shape[2]):
        out.addcmul_(z[:, :, d], z[:, :, d])
    return out


def batched_mixture_nll(
    xt: Tensor, logits: Tensor, means: Tensor, cov: Covariance, scale: float, work: Workspace | None = None
) -> Tensor:
    """(B,) scale * sum_n log p_b(x_bn) for B mixtures (`_BatchedMixtureNLL`; xt is the data transposed,
    (B or 1, D, N)): the population fit's loss with scale = -1/N is the sum of its entries, each member's mean NLL.
    `work`: a `Workspace` to reuse buffers across calls (one per fit); fresh tensors without it."""
    whitener = tril_inverse(cov.scale_tril) if cov.scale_tril is not None else cov.variances.rsqrt()
    return _BatchedMixtureNLL.apply(xt, means, logits, whitener, cov.half_log_det, scale, work or _Fresh)
