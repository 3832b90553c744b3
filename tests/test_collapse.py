"""The collapse rules, each checked on a state the test builds (no long fit decides the outcome).

Every test starts from `init="keep"` with parameters set by hand and takes one to three Adam steps, so the
outcome follows from the rule and not from where a chaotic trajectory happens to go:

- component 0 sits exactly on an isolated point P with a variance just above the floor. The only data it
  explains is P, so the gradient of its log-variance is positive (the NLL falls as the variance shrinks) and
  Adam's first step, about `component_lr` in log units, takes it below the floor: the clamp must act, and its
  responsibility mass is 1 < D + 1, so the reset must follow;
- component 1 covers a Gaussian cluster with the cluster's own variance: far above the floor, untouched;
- component 2 sits on ten duplicates of one point Q, also just above the floor: the clamp acts on it too,
  but its mass is 10 >= D + 1, so it is a genuine cluster and must not be reset;
- ten points spread far from every component are the worst-explained 10% of the data: a reset must move
  the mean onto one of them.

Adam's first step is lr * g / (|g| + eps) per entry, i.e. lr * sign(g) up to eps / |g| (1e-8 against
gradients of 1e-3 or more here), which is what makes the step below the floor certain.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gmm
from gmm import likelihood
from gmm.records import FitEvent

NOT_SHARED = ["full", "diagonal", "isotropic"]  # per-component covariances: the reset applies to them
CLAMP = 1e-4
LR = 0.1  # log-variance steps of 0.1 (Cholesky: log L_kk, so variance x e^-0.2): 1.05 * CLAMP falls below CLAMP
P = (30.0, 30.0)
Q = (30.0, -30.0)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(100, 2) float64: 79 cluster points, P once, Q ten times, and the 10 far points (returned apart)."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randn(79, 2, generator=g, dtype=torch.float64)
    far = torch.tensor([-40.0, 40.0], dtype=torch.float64) + 3.0 * torch.randn(10, 2, generator=g, dtype=torch.float64)
    point = torch.tensor([P], dtype=torch.float64)
    dup = torch.tensor([Q], dtype=torch.float64).repeat(10, 1)
    x = torch.cat([cluster, point, dup, far])
    return x, far


def _model(family: str, x: torch.Tensor, logits=(0.0, 0.0, 0.0), variance: float = 1.05 * CLAMP) -> gmm.MixtureModel:
    """Component 0 on P, 1 on the cluster (its own covariance), 2 on Q; 0 and 2 at `variance`."""
    model = gmm.make_model(family, 3, 2, dtype=torch.float64)
    cluster = x[:79]
    covs = torch.stack([variance * torch.eye(2), torch.cov(cluster.T), variance * torch.eye(2)]).double()
    model.set_parameters(means=torch.stack([x[79], cluster.mean(0), x[80]]), covariances=covs)
    with torch.no_grad():
        model.logits.copy_(torch.tensor(logits, dtype=torch.float64))
    return model


def _fit(model, x, steps: int = 1, **options) -> gmm.FitResult:
    # the collapse rules alone: no spike rollback, and the model keeps the last iterate (not the best)
    options = {"component_lr": LR, "clamp": CLAMP, "lr_schedule": "constant", "init": "keep",
               "spike_threshold": None, "keep_best": False, **options}  # fmt: skip
    return gmm.fit(model, x, num_iterations=steps, **options)


def _kinds(result) -> list[tuple[int, int, str]]:
    return [(e.step, e.component, e.kind) for e in result.events]


@pytest.mark.parametrize("family", NOT_SHARED)
def test_the_floor_acts_on_exactly_the_components_pushed_below_it(family):
    x, _ = _data()
    model = _model(family, x)
    cluster_cov = model.covariances[1].clone()
    result = _fit(model, x, reset=False)
    assert _kinds(result) == [(1, 0, "clamp"), (1, 2, "clamp")]
    variances = model.covariances.diagonal(dim1=-2, dim2=-1)
    # on the floor now; float64 rounding of exp(log(sqrt(clamp)))^2 is a few ulps
    torch.testing.assert_close(variances[[0, 2]].amin(-1), torch.full((2,), CLAMP, dtype=torch.float64), rtol=1e-12, atol=0)
    assert bool((variances >= CLAMP * (1 - 1e-12)).all())
    # component 1 moved by one Adam step (relative change <= ~e^(2 lr) - 1), nowhere near the floor
    assert float(variances[1].amin()) > 0.5 * float(cluster_cov.diagonal().amin())
    for event in result.events:
        before = float(event.detail.split()[1])  # "variance <v> raised to <clamp>"
        assert before < CLAMP and f"raised to {CLAMP:.3g}" in event.detail


@pytest.mark.parametrize("family", NOT_SHARED)
def test_reset_takes_only_components_with_little_responsibility_mass(family):
    """Component 0 (mass 1) is reset; component 2 (mass 10, a genuine cluster of duplicates) is only clamped.
    The reset lifts component 0 off the floor onto the far points, which the start explained worst, so the
    NLL after the step is far below the start's: component 0 has recovered at the reset's own step."""
    x, _ = _data()
    model = _model(family, x)
    result = _fit(model, x)
    assert _kinds(result) == [(1, 0, "clamp"), (1, 2, "clamp"), (1, 0, "reset"), (1, 0, "recovered")]
    assert result.recovered_count == 1 and "0 steps after its clamp at step 1" in result.events[-1].detail
    reset = result.events[2]
    mass = float(reset.detail.split()[1])  # "mass <m> < <min_mass> on the floor; ..."
    assert mass == pytest.approx(1.0, abs=1e-6)  # exactly P's responsibility
    torch.testing.assert_close(model.means[2], torch.tensor(Q, dtype=torch.float64), rtol=0, atol=1e-12)  # Q stays
    # with a threshold below 1, nothing is reset; above 10, both are
    assert [k for _, _, k in _kinds(_fit(_model(family, x), x, reset_min_mass=0.5))] == ["clamp", "clamp"]
    assert [c for _, c, k in _kinds(_fit(_model(family, x), x, reset_min_mass=11.0)) if k == "reset"] == [0, 2]


@pytest.mark.parametrize("family", NOT_SHARED)
@pytest.mark.parametrize("seed", range(6))
def test_reset_moves_the_mean_to_a_worst_explained_point(family, seed):
    """The 10 far points are the worst-explained 10% of the 100: the new mean is one of them, whatever the
    seed (a draw from all points would land on one of them with probability 0.1 per seed)."""
    x, far = _data(seed)
    model = _model(family, x)
    _fit(model, x, seed=seed)
    new_mean = model.means[0]
    on_far = torch.isclose(far, new_mean, rtol=1e-12, atol=1e-12).all(-1)  # rounding of the map back to data units
    assert bool(on_far.any()), f"mean {new_mean.tolist()} is not one of the worst-explained points"
    # and its covariance restarts at cov(X) / K^(2/D) (+ a 1e-6-relative ridge), here numpy's covariance / 3
    expected = torch.from_numpy(np.cov(x.numpy().T)) / 3.0
    variances = model.covariances[0].diagonal()
    if family == "isotropic":
        expected_var = expected.diagonal().mean().expand(2)
    else:
        expected_var = expected.diagonal()
    torch.testing.assert_close(variances, expected_var, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", NOT_SHARED)
def test_reset_sets_the_weight_logit_to_the_mean_logit(family):
    x, _ = _data()
    logits = (0.5, 2.0, -1.0)  # mean 0.5, minimum -1.0; mixture_lr=0 keeps them through the step
    model = _model(family, x, logits=logits)
    _fit(model, x, mixture_lr=0.0)
    assert float(model.logits.detach()[0]) == pytest.approx(sum(logits) / 3, abs=1e-12)
    torch.testing.assert_close(model.logits.detach()[1:], torch.tensor(logits[1:], dtype=torch.float64), rtol=0, atol=0)


def _adam_first_two_steps_update(g: torch.Tensor, lr: float, beta1=0.9, beta2=0.999, eps=1e-8) -> torch.Tensor:
    """Adam's update at global step 2 for moments that were zero after step 1 (bias correction at t = 2)."""
    m_hat = (1 - beta1) * g / (1 - beta1**2)
    v_hat = (1 - beta2) * g.square() / (1 - beta2**2)
    return lr * m_hat / (v_hat.sqrt() + eps)


@pytest.mark.parametrize("family", NOT_SHARED)
def test_reset_zeroes_the_adam_moments_of_the_reset_component(family):
    """After the reset at step 1, step 2 moves component 0's log-variances exactly as Adam with zero moments
    would: the oracle is the gradient at the post-reset state, computed here by autograd. Moments carried over
    from step 1 (where the gradient pushed the variance down hard) would give another step."""
    x, _ = _data()
    after_one = _model(family, x)
    _fit(after_one, x, mixture_lr=0.0)
    after_two = _model(family, x)
    result = _fit(after_two, x, steps=2, mixture_lr=0.0)
    assert _kinds(result)[:3] == [(1, 0, "clamp"), (1, 2, "clamp"), (1, 0, "reset")]

    def log_variances(model):  # the raw entries of component 0 that are log-variances (or log L_kk)
        raw = model.raw_cov[0]
        return raw.diagonal() if raw.ndim == 2 else raw

    raw = after_one.raw_cov.detach().clone().requires_grad_()
    fam = after_one.family
    nll = -likelihood.log_prob(x, after_one.logits.detach(), after_one.locs.detach(), fam.covariance(raw)).mean()
    (grad,) = torch.autograd.grad(nll, raw)
    g0 = grad[0].diagonal() if grad[0].ndim == 2 else grad[0]
    assert bool((g0.abs() > 1e-4).all())  # far above eps: the step is lr-sized
    expected = log_variances(after_one) - _adam_first_two_steps_update(g0, LR)
    torch.testing.assert_close(log_variances(after_two), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", NOT_SHARED)
def test_events_come_in_order_and_a_reset_only_follows_its_clamp(family):
    x, _ = _data()
    result = _fit(_model(family, x), x, steps=3)
    steps = [e.step for e in result.events]
    assert steps == sorted(steps) and all(1 <= s <= 3 for s in steps)
    clamped = set()
    for e in result.events:
        if e.kind == "clamp":
            clamped.add((e.step, e.component))
        elif e.kind == "reset":
            assert (e.step, e.component) in clamped, f"reset without a clamp at the same step: {e}"
        else:  # "recovered" follows a clamp of the same component, at the same step (its reset) or earlier
            assert e.kind == "recovered" and any(c == e.component and s <= e.step for s, c in clamped), e
    assert result.clamp_count == sum(e.kind == "clamp" for e in result.events) >= 2
    assert result.reset_count == 1


@pytest.mark.parametrize("family", ["tied", "shared_isotropic"])
def test_a_shared_covariance_is_clamped_as_component_minus_one_and_never_reset(family):
    """Three components on three point masses (10 copies each), the shared variance just above the floor:
    every component wants a smaller variance, so the shared one crosses the floor at step 1."""
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    x = points.repeat_interleave(10, 0)
    model = gmm.make_model(family, 3, 2, dtype=torch.float64)
    model.set_parameters(means=points, covariances=(1.05 * CLAMP * torch.eye(2, dtype=torch.float64)).expand(3, 2, 2))
    result = _fit(model, x, steps=2)
    assert [(s, c, k) for s, c, k in _kinds(result) if s == 1] == [(1, -1, "clamp")]
    assert result.reset_count == 0  # each component holds 10 points
    assert float(model.covariances.diagonal(dim1=-2, dim2=-1).amin()) >= CLAMP * (1 - 1e-12)


@pytest.mark.parametrize("family", NOT_SHARED)
def test_the_analytic_path_clamps_and_resets_like_autograd(family):
    """Same built state, three steps: same events, same parameters to float64 rounding (both paths compute the
    same sums in another order; 1e-9 leaves room for Adam's division by sqrt(v) of gradients near 1e-4)."""
    x, _ = _data()
    models = {}
    events = {}
    for gradients in ("autograd", "analytic"):
        model = _model(family, x)
        events[gradients] = _kinds(_fit(model, x, steps=3, gradients=gradients))
        models[gradients] = model
    assert events["analytic"] == events["autograd"]
    assert (1, 0, "reset") in events["autograd"]
    for name in ("logits", "locs", "raw_cov"):
        got, want = getattr(models["analytic"], name), getattr(models["autograd"], name)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.filterwarnings("ignore::gmm.em.ConvergenceWarning")  # one M-step, on purpose
@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic", "tied", "shared_isotropic"])
def test_em_reports_the_floor_where_a_component_has_no_scatter(family):
    """EM's M-step: component 0 owns P alone (scatter 0), so the floor dominates its covariance; the cluster
    component has unit scatter and no event. Shared families pool the scatter: an event only if it is tiny."""
    x, _ = _data()
    model = _model(family, x, variance=1.0)
    model.fit_em(x, num_iterations=1, clamp=CLAMP, init="keep")
    events = model.fit_result_.events
    assert all(isinstance(e, FitEvent) and e.kind == "clamp" and e.step == 1 for e in events)
    if model.family.shared:
        assert events == ()  # pooled scatter is O(1): the floor does not dominate
    else:
        assert [e.component for e in events] == [0, 2]  # P alone and Q's duplicates: zero scatter
        assert bool((model.covariances[0].diagonal() >= CLAMP).all())
        assert math.isclose(float(model.covariances[0].diagonal().amin()), CLAMP, rel_tol=1e-6)


# -- the arithmetic must not hide collapse ------------------------------------------------------------------
# Adam normalizes every gradient entry: a mean gradient of rounding size (1e-8) becomes a step of the full
# learning rate. A component sitting on a point mass gets an exactly zero mean gradient only if the
# Mahalanobis distance is exactly 0 at x == mu; the product form W x - W mu of the Cholesky families left a
# residue of eps |W x| there, so their means jittered off the point and they never collapsed while the
# diagonal families did. These tests pin the exact zero for every family and every likelihood path.
@pytest.mark.parametrize("augmented", [False, True])
@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_the_distance_is_exactly_zero_where_a_point_sits_on_a_mean(family, augmented):
    """20 float32 components, each mean on a data point far from the origin (where a residue would show)."""
    g = torch.Generator().manual_seed(3)
    means = 30.0 * torch.randn(20, 3, generator=g)
    a = torch.randn(20, 3, 3, generator=g)
    covs = a @ a.transpose(-1, -2) + 0.5 * torch.eye(3)
    model = gmm.make_model(family, 20, 3)
    model.set_parameters(means=means, covariances=covs)
    data = likelihood.augment(means) if augmented else means
    q = likelihood._mahalanobis(data, model.locs.detach(), model.covariance(), augmented)
    assert torch.count_nonzero(q.diagonal()) == 0, q.diagonal()


@pytest.mark.parametrize("gradients", ["autograd", "analytic"])
@pytest.mark.parametrize("family", NOT_SHARED)
def test_a_mean_on_a_float32_point_mass_gets_an_exactly_zero_gradient_and_collapses(family, gradients):
    """float32, the fit's own dtype: component 0 on 30 copies of a point far from the origin, nothing else near.
    Its mean must not move at all (an exactly zero gradient), and its variance, falling by e^-0.1 (log
    variance) or e^-0.2 (log L_kk) a step at lr 0.1, must reach a floor 1e-4 below its start within 120 steps
    (92 and 46 needed): a clamp event."""
    x, _ = _data()
    point = torch.tensor([[24.0, -24.0]], dtype=torch.float64).repeat(30, 1)
    x = torch.cat([x[:79], point]).float()
    model = gmm.make_model(family, 2, 2)
    covariances = torch.stack([0.01 * torch.eye(2), torch.cov(x[:79].T)])
    model.set_parameters(means=torch.stack([x[79], x[:79].mean(0)]), covariances=covariances)
    start = model.means[0].clone()
    result = _fit(model, x, steps=120, clamp=1e-6, reset=False, gradients=gradients, standardize=False)
    assert torch.equal(model.means[0], start)
    assert (1, 0, "clamp") not in _kinds(result) and any(e.component == 0 and e.kind == "clamp" for e in result.events)
