r"""The mean NLL of a Gaussian mixture and its gradients, derived by hand (no autograd, no torch.distributions).

Notation: data x_n (n = 1..N, dimension D), weight logits l_k, means mu_k, covariances Sigma_k in the raw
parameterization of `gmm.families` (K' = K, or 1 for shared families).

Forward::

    a_nk  = log pi_k - 1/2 log det(2 pi Sigma_k) - 1/2 q_nk,    log pi = log_softmax(l)
    q_nk  = (x_n - mu_k)^T Sigma_k^{-1} (x_n - mu_k) = |z_nk|^2
    NLL   = -(1/N) sum_n logsumexp_k a_nk

with z_nk = L_k^{-1} (x_n - mu_k) for Cholesky families (Sigma = L L^T; log det Sigma = 2 sum_i log L_ii,
never a determinant or an inverse of Sigma), z_nkd = (x_nd - mu_kd) / s_kd for diagonal ones.

Backward: dNLL/da_nk = -r_nk / N with the responsibilities r_nk = softmax_k(a_nk). With the sufficient
statistics N_k = sum_n r_nk, u_k = sum_n r_nk z_nk (D,), the gradients are:

* logits:   dNLL/dl_k = pi_k - N_k / N            (so N_k = N (pi_k - dNLL/dl_k): the responsibility mass)
* means:    dNLL/dmu_k = -(1/N) Sigma_k^{-1} sum_n r_nk (x_n - mu_k) = -(1/N) L_k^{-T} u_k
            (diagonal families: -(1/N) u_k / s_k)
* full / tied, raw = strict lower triangle of L plus log diag(L), W = L^{-1}, Z_k = sum_n r_nk z_nk z_nk^T:
  from dq = -2 z^T W dL z and d log det L = tr(W dL),
      dNLL/dL_k = -(1/N) tril(W_k^T Z_k - N_k diag(W_k)),
  so  dNLL/draw_ij = -(1/N) (W_k^T Z_k)_ij                       (i > j)
      dNLL/draw_ii = -(1/N) ((W_k^T Z_k)_ii L_ii - N_k)           (chain rule through L_ii = exp(raw_ii));
  tied sums Z_k and N_k over k. Entries above the diagonal do not enter the model: gradient 0.
* diagonal, raw_kd = log s2_kd:  dNLL/draw_kd = -(1/2N) (sum_n r_nk z_nkd^2 - N_k)
* isotropic, raw_k = log s2_k:   dNLL/draw_k  = -(1/2N) (sum_n r_nk q_nk - D N_k); shared_isotropic sums over k
* constant: its fixed variance is a shared_isotropic one: `nll_and_grad` returns that gradient, the step
  never applies it.

The log-sum-exp clamps its shifted arguments at `likelihood.exp_floor` before `exp` (exp below its underflow
point is very slow on CPU), exactly as `gmm.likelihood` does; the gradients ignore the clamp (it changes r by
less than 1e-34). The analytic gradients agree with autograd to rounding (about 1e-14 in float64).

Three ways in:

* `nll_and_grad(x, logits, locs, raw_cov, family)` -> (nll, (g_logits, g_locs, g_raw)).
* `ScratchNLL.apply(x, logits, locs, raw_cov, family)`: a torch.autograd.Function (gradcheck-able).
* `make_step(model, x, opts, quadratic)`: the step object `gmm.fit` uses with `gradients="analytic"` or
  `compile=True`. It does the gradients, the Adam update (the arithmetic of `torch.optim.Adam`: bias-corrected,
  betas 0.9/0.999, eps 1e-8) and the variance floor in one function; with `compile=True` that function is
  `torch.compile`d into one fused graph (learning rates enter as a tensor, so changing them never recompiles;
  for D <= 8 the triangular inverse and the small products are unrolled so nothing leaves the fused kernels).
  Compilation happens when the step is built, on copies of the state, and its time is `compile_time`; when it
  fails the step logs a warning and runs eagerly. The quadratic-expansion likelihood is not implemented here:
  the analytic path always uses the exact difference form (`quadratic` is ignored).
"""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import torch
from torch import Tensor

from .families import Family, get_family
from .likelihood import LOG_2PI, exp_floor, whiten
from .model import chunk_rows, parameter_tensors

log = logging.getLogger(__name__)

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # Adam's defaults, as in gmm.optim.FusedAdam
_FUSED_MAX_DIMS = 8  # compiled path: transposed layout, unrolled solves and D x D products up to this D


class _Spec(NamedTuple):
    """What the arithmetic depends on besides tensor shapes (static under torch.compile)."""

    kind: str  # the family's `analytic`: "cholesky" (full, tied), "diagonal", "isotropic" (isotropic, shared, constant)
    shared: bool
    fused: bool  # data transposed (D, N), broadcast sums, unrolled solves: what fuses when compiled


# (family.analytic, family.shared) pairs whose gradients `_nll_grad` derives; a shared diagonal is not among them
_SUPPORTED = {("cholesky", False), ("cholesky", True), ("diagonal", False), ("isotropic", False), ("isotropic", True)}


def _spec(family: Family, fused: bool = False) -> _Spec:
    """The family's gradient form, from its `analytic` attribute (raises for a family without one)."""
    if (family.analytic, family.shared) not in _SUPPORTED:
        shared = "shared" if family.shared else "per-component"
        raise ValueError(
            f"the {family.name!r} family has no hand-derived gradients (analytic={family.analytic!r} with "
            f"{shared} covariances; gmm.scratch derives cholesky and isotropic ones, shared or not, and "
            "per-component diagonal ones); fit it with gradients='autograd' and compile=False"
        )
    return _Spec(family.analytic, family.shared, fused)


# -- the arithmetic ---------------------------------------------------------------------------------------
def _tril_inverse(tril: Tensor, unrolled: bool) -> Tensor:
    """(K', D, D) lower-triangular L -> L^{-1}."""
    num_dims = tril.shape[-1]
    if not unrolled:
        eye = torch.eye(num_dims, dtype=tril.dtype, device=tril.device).expand_as(tril)
        return torch.linalg.solve_triangular(tril, eye, upper=False)
    # forward substitution, one row of W = L^{-1} at a time: W_i = (e_i - sum_{m<i} L_im W_m) / L_ii
    eye = torch.eye(num_dims, dtype=tril.dtype, device=tril.device)
    rows: list[Tensor] = []
    for i in range(num_dims):
        acc = eye[i].expand(tril.shape[0], num_dims)
        for m in range(i):
            acc = acc - tril[:, i, m : m + 1] * rows[m]
        rows.append(acc / tril[:, i, i : i + 1])
    return torch.stack(rows, dim=1)  # (K', D, D)


def _cov_terms(raw: Tensor, spec: _Spec, num_dims: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(scale, half_log_det (K',), diag_l): scale is W = L^{-1} (K', D, D) for Cholesky families (diag_l the
    (K', D) diagonal of L), else the inverse standard deviations (K', D) or (K', 1)."""
    if spec.kind == "cholesky":
        log_diag = raw.diagonal(dim1=-2, dim2=-1)  # (K', D)
        diag_l = log_diag.exp()
        tril = raw.tril(-1) + torch.diag_embed(diag_l)  # L (K', D, D)
        return _tril_inverse(tril, spec.fused), log_diag.sum(-1), diag_l
    if spec.kind == "diagonal":
        return (-0.5 * raw).exp(), 0.5 * raw.sum(-1), None
    return (-0.5 * raw).exp(), (0.5 * num_dims) * raw[:, 0], None  # isotropic: (K', 1)


def _chunk_stats(x: Tensor, locs: Tensor, bias: Tensor, scale: Tensor, spec: _Spec):
    """Sufficient statistics of one chunk of rows: (sum_n lse_n, N_k (K,), u_k (K, D), second).

    `x` is (N, D), or (D, N) when `spec.fused` (N innermost, so the fused kernels vectorize over samples).
    `second` is Z_k (K, D, D) for Cholesky families, sum_n r z^2 (K, D) for diagonal, sum_n r q (K,) else.
    """
    if spec.fused:
        return _chunk_stats_fused(x, locs, bias, scale, spec)
    num_samples, num_dims = x.shape
    if spec.kind == "cholesky":
        z = whiten(x, scale.expand(locs.shape[0], -1, -1), locs)  # (N, K, D) L_k^{-1} (x_n - mu_k), exact at x == mu
    else:
        z = (x.unsqueeze(1) - locs) * scale  # (N, K, D)
    zsq = z.square()
    q = zsq.sum(-1)  # (N, K)
    joint = bias - 0.5 * q  # (N, K)
    peak = joint.amax(-1, keepdim=True)
    e = (joint - peak).clamp(min=exp_floor(x.dtype)).exp()
    total = e.sum(-1, keepdim=True)  # (N, 1)
    lse_sum = (total.log() + peak).sum()
    r = e / total  # (N, K) responsibilities
    counts = r.sum(0)  # (K,)
    rz = r.unsqueeze(-1) * z  # (N, K, D)
    u = rz.sum(0)  # (K, D)
    if spec.kind == "cholesky":
        second = rz.permute(1, 2, 0) @ z.transpose(0, 1)  # (K, D, N) @ (K, N, D)
    elif spec.kind == "diagonal":
        second = (r.unsqueeze(-1) * zsq).sum(0)  # (K, D)
    else:
        second = (r * q).sum(0)  # (K,)
    return lse_sum, counts, u, second


def _chunk_stats_fused(xt: Tensor, locs: Tensor, bias: Tensor, scale: Tensor, spec: _Spec):
    """`_chunk_stats` on transposed data xt (D, N), written as broadcasts and sums only (no matrix products)."""
    diff = xt - locs.unsqueeze(-1)  # (K, D, N)
    if spec.kind == "cholesky":
        z = (scale.unsqueeze(-1) * diff.unsqueeze(1)).sum(2)  # (K, D, N): sum_j W_kij (x_nj - mu_kj)
    else:
        z = diff * scale.unsqueeze(-1)  # (K, D, N)
    zsq = z.square()
    q = zsq.sum(1)  # (K, N)
    joint = bias.unsqueeze(-1) - 0.5 * q  # (K, N)
    peak = joint.amax(0)  # (N,)
    e = (joint - peak).clamp(min=exp_floor(xt.dtype)).exp()
    total = e.sum(0)  # (N,)
    lse_sum = (total.log() + peak).sum()
    r = e / total  # (K, N)
    counts = r.sum(-1)  # (K,)
    rz = r.unsqueeze(1) * z  # (K, D, N)
    u = rz.sum(-1)  # (K, D)
    if spec.kind == "cholesky":
        second = (rz.unsqueeze(2) * z.unsqueeze(1)).sum(-1)  # (K, D, D)
    elif spec.kind == "diagonal":
        second = (rz * z).sum(-1)  # (K, D)
    else:
        second = (r * q).sum(-1)  # (K,)
    return lse_sum, counts, u, second


def _nll_grad(chunks, logits: Tensor, locs: Tensor, raw: Tensor, spec: _Spec):
    """(nll, counts N_k, g_logits, g_locs, g_raw) over the row chunks of the data (see the module docstring)."""
    num_dims = locs.shape[1]
    num_samples = sum(c.shape[-1] if spec.fused else c.shape[0] for c in chunks)
    inv_n = 1.0 / num_samples
    log_pi = torch.log_softmax(logits, -1)
    scale, half_log_det, diag_l = _cov_terms(raw, spec, num_dims)
    bias = log_pi - half_log_det - 0.5 * num_dims * LOG_2PI  # (K,)
    stats = [_chunk_stats(c, locs, bias, scale, spec) for c in chunks]
    if len(stats) == 1:
        lse_sum, counts, u, second = stats[0]
    else:
        lse_sum, counts, u, second = (sum(parts[1:], parts[0]) for parts in zip(*stats, strict=True))
    nll = lse_sum * -inv_n
    g_logits = log_pi.exp() - counts * inv_n
    if spec.kind == "cholesky":
        if spec.fused:
            g_locs = (scale * u.unsqueeze(-1)).sum(-2) * -inv_n  # -(1/N) W^T u
        else:
            g_locs = (scale.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1) * -inv_n
        if spec.shared:
            second = second.sum(0, keepdim=True)
            mass = counts.sum(0, keepdim=True)
        else:
            mass = counts
        if spec.fused:
            wz = (scale.unsqueeze(-1) * second.unsqueeze(-2)).sum(-3)  # W^T Z (K', D, D)
        else:
            wz = scale.transpose(-1, -2) @ second
        diag = wz.diagonal(dim1=-2, dim2=-1) * diag_l - mass.unsqueeze(-1)  # (K', D)
        g_raw = (wz.tril(-1) + torch.diag_embed(diag)) * -inv_n
    else:
        g_locs = u * scale * -inv_n
        if spec.kind == "diagonal":
            g_raw = (second - counts.unsqueeze(-1)) * (-0.5 * inv_n)
        else:
            g_raw = (second - num_dims * counts) * (-0.5 * inv_n)
            g_raw = g_raw.sum(0, keepdim=True).unsqueeze(-1) if spec.shared else g_raw.unsqueeze(-1)
    return nll, counts, g_logits, g_locs, g_raw


def _as_family(family: Family | str, num_dims: int) -> Family:
    if isinstance(family, Family):
        return family
    if isinstance(family, str):
        return get_family(family, num_dims)
    raise TypeError(f"family must be a gmm.families.Family or a family name; got {type(family).__name__}")


def nll_and_grad(
    x: Tensor, logits: Tensor, locs: Tensor, raw_cov: Tensor, family: Family | str
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The mean NLL and its hand-derived gradients (see the module docstring).

    Args:
        x: (N, D) data.
        logits: (K,) weight logits.
        locs: (K, D) means.
        raw_cov: the family's raw covariance tensor (shapes in `gmm.families`).
        family: a `Family` object or a name from `gmm.FAMILIES`.

    Returns:
        (nll, (g_logits (K,), g_locs (K, D), g_raw like raw_cov)); nll is a 0-d tensor. For `constant`,
        g_raw is the gradient with respect to its fixed log variance. Nothing is tracked by autograd.
    """
    fam = _as_family(family, x.shape[-1])
    with torch.no_grad():
        nll, _, g_logits, g_locs, g_raw = _nll_grad([x], logits, locs, raw_cov, _spec(fam))
    return nll, (g_logits, g_locs, g_raw)


class ScratchNLL(torch.autograd.Function):
    """The mean NLL with the hand-derived backward: `ScratchNLL.apply(x, logits, locs, raw_cov, family)`.

    Differentiable with respect to logits, locs and raw_cov (not x); first derivatives only.
    """

    @staticmethod
    def forward(ctx, x, logits, locs, raw_cov, family):
        nll, grads = nll_and_grad(x, logits.detach(), locs.detach(), raw_cov.detach(), family)
        ctx.save_for_backward(*grads)
        return nll

    @staticmethod
    def backward(ctx, grad_output):
        g_logits, g_locs, g_raw = ctx.saved_tensors
        return None, grad_output * g_logits, grad_output * g_locs, grad_output * g_raw, None


# -- the fused step ---------------------------------------------------------------------------------------
def _adam_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: Tensor, bc2_sqrt: Tensor):
    """torch.optim.Adam's update in place (the order of operations of its fused CPU kernel)."""
    exp_avg.lerp_(grad, 1.0 - BETA1)
    exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1.0 - BETA2)
    denom = exp_avg_sq.sqrt() / bc2_sqrt + EPS
    param.sub_(step_size * exp_avg / denom)


def _make_fused_step(family: Family, spec: _Spec):
    """The whole step as one function of tensors: gradients, Adam, floor. Mutates params and moments."""
    floor_view = family.floor_view
    floor_scale = family.floor_scale
    trainable = family.trainable

    def fused_step(chunks, logits, locs, raw, m_logits, v_logits, m_locs, v_locs, m_raw, v_raw, scalars, floor):
        # scalars: [mixture lr / bc1, component lr / bc1, sqrt(bc2)]; floor: the raw floor, (1,) or (m,)
        nll, counts, g_logits, g_locs, g_raw = _nll_grad(chunks, logits, locs, raw, spec)
        bc2_sqrt = scalars[2]
        _adam_(logits, g_logits, m_logits, v_logits, scalars[0], bc2_sqrt)
        _adam_(locs, g_locs, m_locs, v_locs, scalars[1], bc2_sqrt)
        if trainable:
            _adam_(raw, g_raw, m_raw, v_raw, scalars[1], bc2_sqrt)
            view = floor_view(raw)  # (K', m)
            smallest = (view - floor).amin(-1)  # < 0 where the floor acts
            clamped = smallest < 0
            view.clamp_(min=floor)
            smallest = (smallest * (1.0 / floor_scale)).exp()  # variance / floor
        else:
            clamped = torch.zeros(1, dtype=torch.bool, device=raw.device)
            smallest = raw.exp().reshape(1)
        return nll, counts, clamped, smallest

    return fused_step


class _Compiled(NamedTuple):
    """A compiled fused step: `fn(*[leaves[i] for i in order])` runs it on the flat list of tensor inputs."""

    fn: object
    order: tuple[int, ...]


_COMPILED: dict[tuple, _Compiled] = {}  # per process: one compilation per (family, layout, shapes, dtypes)
_COMPILED_MAX = 32


def _leaves(chunks, params, exp_avg, exp_avg_sq, scalars, floor) -> list[Tensor]:
    """The fused step's arguments, flattened in its signature's order."""
    (m_l, m_m, m_r), (v_l, v_m, v_r) = exp_avg, exp_avg_sq
    return [*chunks, *params, m_l, v_l, m_m, v_m, m_r, v_r, scalars, floor]


def _call(fn, leaves: list[Tensor], num_chunks: int):
    return fn(tuple(leaves[:num_chunks]), *leaves[num_chunks:])


def _compile_direct(fn, leaves: list[Tensor], num_chunks: int) -> tuple[_Compiled | None, object]:
    """torch.compile `fn` (run once on `leaves`, whose state it mutates) and capture Inductor's compiled graph.

    Calling the captured graph directly skips TorchDynamo's per-call frame evaluation and guards, which at
    small sizes cost more than the step itself; the captured graph is checked against the Dynamo-compiled
    function on a second copy of the state before it is trusted. Returns (captured or None, the
    Dynamo-compiled function, already warm).
    """
    captured: list = []

    # A private torch API, kept for speed: no public API hands back Inductor's compiled graph, and calling it
    # directly took 35 us per step against 62 us through public torch.compile's frame (N=1000, K=5, D=2, full,
    # float32, one thread, torch 2.13 CPU; eager: 259 us). tests/test_scratch.py fails loudly when
    # `compile_fx` moves or its call changes; until then a failure here only falls back to eager (a warning).
    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415  (only when compiling)

        compiled = compile_fx(gm, example_inputs)
        captured.append((compiled, list(example_inputs)))
        return compiled

    dynamo_fn = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    twin = [t if i < num_chunks else t.clone() for i, t in enumerate(leaves)]
    out = _call(dynamo_fn, leaves, num_chunks)
    if len(captured) != 1:
        return None, dynamo_fn
    compiled, inputs = captured[0]
    order = []
    for t in inputs:
        match = [i for i, leaf in enumerate(leaves) if leaf is t]
        if len(match) != 1:
            return None, dynamo_fn
        order.append(match[0])
    twin_out = compiled(*[twin[i] for i in order])
    same = (
        isinstance(twin_out, list | tuple)
        and len(twin_out) == len(out)
        and all(torch.equal(a, b) for a, b in zip(out, twin_out, strict=True))
        and all(torch.equal(a, b) for a, b in zip(leaves, twin, strict=True))
    )
    return (_Compiled(compiled, tuple(order)) if same else None), dynamo_fn


def _meta(t: Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, str(t.device))


class ScratchStep:
    """Step function of `gmm.fit` on hand-derived gradients; the `gmm.steps.Step` protocol, full batch only.

    The variance floor `clamp` (default `opts.clamp`; a float or (D,) per-axis floors) is applied inside
    `step`; `clamp` returns what it did.
    Attributes: `compile_time` (seconds; 0 when eager or when this configuration was already compiled in this
    process), `compiled` (whether the step runs compiled).
    """

    batch_size = None  # full batch only (make_step refuses batch_size)

    def __init__(self, model, x: Tensor, opts, quadratic: bool = False, clamp: float | Tensor | None = None):
        self.model = model
        self.family = model.family
        self.num_samples = x.shape[0]
        self.clamp_value = opts.clamp if clamp is None else clamp
        if quadratic:
            log.debug("the analytic step has no quadratic-expansion path; using the exact difference form")
        self.rows = x.split(chunk_rows(model.num_components, model.num_dims))
        # detached aliases: the step writes the model's parameters in place
        self.params = tuple(parameter_tensors(model))
        self.exp_avg = tuple(torch.zeros_like(p) for p in self.params)
        self.exp_avg_sq = tuple(torch.zeros_like(p) for p in self.params)
        # [mixture lr / bc1, component lr / bc1, sqrt(bc2)]: written in place every step, so the
        # compiled step sees new learning rates without recompiling
        self.scalars = torch.zeros(3, dtype=self.params[1].dtype, device=self.params[1].device)
        floor = torch.as_tensor(self.family.raw_floor(self.clamp_value), dtype=self.scalars.dtype)
        self.floor = floor.to(self.scalars.device).reshape(-1)  # (1,) or (m,): broadcasts over the floored view
        self._scalars_np = self.scalars.numpy() if self.scalars.device.type == "cpu" else None
        self.num_steps = 0
        self.compile_time = 0.0
        self.compiled = False
        self._direct: _Compiled | None = None
        self._last = None
        self._use(fused=False)
        if opts.compile:
            self._compile(fused=model.num_dims <= _FUSED_MAX_DIMS)

    def _use(self, fused: bool) -> None:
        self.chunks = tuple(c.T.contiguous() for c in self.rows) if fused else tuple(self.rows)
        self._fn = _make_fused_step(self.family, _spec(self.family, fused))
        self._leaves = _leaves(self.chunks, self.params, self.exp_avg, self.exp_avg_sq, self.scalars, self.floor)

    def _compile(self, fused: bool) -> None:
        t0 = time.perf_counter()
        try:
            self._use(fused)
            key = (
                self.family.name,
                _spec(self.family, fused),
                tuple(_meta(t) for t in self._leaves),
                torch.get_num_threads(),
            )
            direct = _COMPILED.get(key)
            if direct is None:
                # compile now, on copies of the state, so that the fit's loop time excludes it
                self._set_scalars(1, 0.0, 0.0)
                copies = [t if i < len(self.chunks) else t.clone() for i, t in enumerate(self._leaves)]
                with torch.no_grad():
                    direct, dynamo_fn = _compile_direct(self._fn, copies, len(self.chunks))
                if direct is None:
                    log.debug("running the compiled step through torch.compile's frame (no direct call)")
                    self._fn = dynamo_fn
                else:
                    if len(_COMPILED) >= _COMPILED_MAX:
                        _COMPILED.pop(next(iter(_COMPILED)))
                    _COMPILED[key] = direct
            if direct is not None:
                self._direct = direct
                self._direct_args = [self._leaves[i] for i in direct.order]
        except Exception as err:  # noqa: BLE001  (any compiler failure: fall back to eager)
            log.warning("torch.compile of the analytic step failed (%s: %s); running eagerly", type(err).__name__, err)
            self._use(fused=False)
            self._direct = None
        else:
            self.compiled = True
        self.compile_time = time.perf_counter() - t0

    def _set_scalars(self, step: int, lr_mixture: float, lr_component: float) -> None:
        bc1 = 1.0 - BETA1**step
        values = (
            lr_mixture / bc1,
            lr_component / bc1,
            math.sqrt(1.0 - BETA2**step),
        )
        if self._scalars_np is not None:
            self._scalars_np[:] = values  # no torch dispatch: cheaper than building a tensor
        else:
            self.scalars.copy_(torch.tensor(values, dtype=self.scalars.dtype))

    def step(self, lr_mixture: float, lr_component: float) -> Tensor:
        """One Adam step on the analytic gradients, then the floor. Returns the NLL before the update (0-d)."""
        self.num_steps += 1
        self._set_scalars(self.num_steps, lr_mixture, lr_component)
        with torch.no_grad():
            if self._direct is not None:
                nll, counts, clamped, smallest = self._direct.fn(*self._direct_args)
            else:
                nll, counts, clamped, smallest = _call(self._fn, self._leaves, len(self.chunks))
        self._last = (counts, clamped, smallest)
        return nll

    def clamp(self, clamp: float | Tensor) -> tuple[Tensor, Tensor] | None:
        """The fused floor's work in the last step (gmm.steps.Step.clamp); another `clamp` is applied by clamp_ too."""
        _, clamped, smallest = self._last
        floats = not isinstance(clamp, Tensor) and not isinstance(self.clamp_value, Tensor)
        if clamp is not self.clamp_value and not (floats and clamp == self.clamp_value):  # (a tensor: clamp_ again)
            again = self.family.clamp_(self.model.raw_cov, clamp)
            if again is not None:
                return clamped | again[0], torch.minimum(smallest, again[1])
        return (clamped, smallest) if bool(clamped.any()) else None

    def mass(self) -> Tensor:
        """(K,) responsibility mass sum_n p(k | x_n) at the parameters of the last step."""
        return self._last[0]

    @torch.no_grad()
    def restart(self) -> None:
        """Zero every moment and the step count: the next step is Adam's first from the current parameters."""
        for t in (*self.exp_avg, *self.exp_avg_sq):  # rare (spike rollbacks): a plain loop is fast enough
            t.zero_()
        self.num_steps = 0

    @torch.no_grad()
    def reset_moments(self, components: Tensor) -> None:
        """Zero the Adam moments of `components` (logits, means, and unshared covariance parameters)."""
        per_component = 3 if self.family.trainable and not self.family.shared else 2
        for m, v in zip(self.exp_avg[:per_component], self.exp_avg_sq[:per_component], strict=True):
            m[components] = 0
            v[components] = 0


def make_step(model, x: Tensor, opts, quadratic: bool = False, clamp: float | Tensor | None = None) -> ScratchStep:
    """The analytic step object for `gmm.fit` (eager, or compiled when `opts.compile`)."""
    return ScratchStep(model, x, opts, quadratic, clamp)
