"""The shared fit loop: quality against scikit-learn's EM, the clamp invariant, events, determinism."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from pathlib import Path

import pytest
import torch
from sklearn.mixture import GaussianMixture

import gmm
from gmm.em import fit_em
from gmm.options import PER_MEMBER, FitOptions, lr_factor, make_options
from gmm.steps import AutogradStep, PopulationStep, Step, make_step

SK = {"full": "full", "tied": "tied", "diagonal": "diag", "isotropic": "spherical"}


@pytest.fixture(scope="module")
def demo_data():
    return {f: gmm.generate_data(1000, 5, 2, 8.0, f, seed=42) for f in ("full", "diagonal", "isotropic", "tied")}


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_reaches_em_nll_at_demo_defaults(family, demo_data):
    mock = demo_data[family]
    model = gmm.make_model(family, 5, 2)
    loss = model.fit(mock.data, num_iterations=1000, mixture_lr=5e-2, component_lr=5e-2)
    x = mock.data.double().numpy()
    em = GaussianMixture(5, covariance_type=SK[family], tol=1e-7, max_iter=5000, random_state=0).fit(x)
    em_nll = -em.score(x)
    assert loss <= em_nll + 0.02, f"{family}: GD {loss:.4f} vs EM {em_nll:.4f}"
    assert loss < float(model.fit_result_.nll_history[0])


def test_returns_final_nll_as_float(demo_data):
    model = gmm.GmmFull(5, 2)
    loss = model.fit(demo_data["full"].data, num_iterations=50)
    assert isinstance(loss, float)
    result = model.fit_result_
    assert result.nll_history.shape == (51,) and result.num_iterations == 50 and result.completed
    assert loss == pytest.approx(-model.score(demo_data["full"].data), abs=1e-9)
    assert loss == result.final_nll == float(result.nll_history[-1])


def test_same_seed_same_history_bit_for_bit(demo_data):
    def run(seed):
        model = gmm.GmmFull(5, 2)
        model.fit(demo_data["full"].data, num_iterations=100, seed=seed, init="random")
        return model.fit_result_.nll_history

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_numpy_input_and_float64(demo_data):
    model = gmm.GmmDiagonal(5, 2, dtype=torch.float64)
    x = demo_data["diagonal"].data.double().numpy()
    loss = model.fit(x, num_iterations=30)
    assert model.means.dtype == torch.float64 and model.fit_result_.nll_history.dtype == torch.float64
    assert math.isfinite(loss) and loss == pytest.approx(-model.score(torch.from_numpy(x)), abs=1e-12)


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_clamp_invariant_every_step(family):
    """Every diagonal element >= clamp and covariances SPD after every step, even on collapsing data."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 2, generator=g), torch.tensor([[9.0, 9.0]]).repeat(3, 1)])
    clamp = 1e-3
    seen = []

    def check(step, nll, events):
        cov = model.covariances
        seen.append(step)
        assert bool((cov.diagonal(dim1=-2, dim2=-1) >= clamp * (1 - 1e-5)).all()), cov
        assert bool((torch.linalg.cholesky_ex(cov.double()).info == 0).all())

    model = gmm.make_model(family, 4, 2)
    model.fit(x, num_iterations=200, clamp=clamp, component_lr=0.1, log_freq=1, callback=check)
    assert len(seen) == 200


def test_zero_learning_rate_freezes_group(demo_data):
    model = gmm.GmmFull(5, 2)
    model.fit(demo_data["full"].data, num_iterations=1, init="random")  # a start
    weights = model.weights.clone()
    model.fit(demo_data["full"].data, num_iterations=50, mixture_lr=0.0, init="keep")
    torch.testing.assert_close(model.weights, weights, rtol=0, atol=0)


def test_tol_stops_early(demo_data):
    """Learning rates 0: the NLL cannot change, so the first comparison (after step 2) stops the fit."""
    model = gmm.GmmFull(5, 2)
    model.fit(demo_data["full"].data, num_iterations=5000, tol=1e-12, mixture_lr=0.0, component_lr=0.0)
    result = model.fit_result_
    assert result.converged and result.num_iterations == 2 and result.completed
    moving = gmm.GmmFull(5, 2)
    moving.fit(demo_data["full"].data, num_iterations=50, tol=1e-12)  # a learning fit changes by more
    assert not moving.fit_result_.converged and moving.fit_result_.num_iterations == 50


def test_callback_receives_steps_and_can_stop(demo_data):
    calls = []

    class Stop(Exception):
        pass

    def callback(step, nll, events):
        calls.append((step, nll))
        if step >= 30:
            raise Stop

    model = gmm.GmmFull(5, 2)
    with pytest.raises(Stop):
        model.fit(demo_data["full"].data, num_iterations=100, log_freq=10, callback=callback)
    assert [s for s, _ in calls] == [10, 20, 30]
    partial = model.fit_result_
    assert not partial.completed and len(partial.nll_history) == 30


def test_non_finite_nll_raises_with_step(demo_data):
    def poison(step, nll, events):
        if step == 20:
            with torch.no_grad():
                model.locs[0, 0] = float("nan")

    model = gmm.GmmFull(5, 2)
    with pytest.raises(gmm.NonFiniteNLLError, match="non-finite") as info:
        model.fit(demo_data["full"].data, num_iterations=200, log_freq=10, callback=poison)
    assert info.value.step == 20
    assert not model.fit_result_.completed


def test_chunked_autograd_equals_single_pass(demo_data, monkeypatch):
    x = demo_data["full"].data.double()
    a = gmm.GmmFull(5, 2, dtype=torch.float64)
    a.fit(x, num_iterations=30)
    monkeypatch.setattr(gmm.model, "_CHUNK_ELEMENTS", 16)  # 1024-row chunks: the fit sums 1 + partial
    b = gmm.GmmFull(5, 2, dtype=torch.float64)
    b.fit(x, num_iterations=30)
    torch.testing.assert_close(a.fit_result_.nll_history, b.fit_result_.nll_history, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["full", "diagonal", "tied"])
def test_quadratic_path_computes_the_difference_path_nll_and_gradients(family, demo_data):
    """At a fixed state (30 steps into a fit), both likelihood paths give the same NLL and gradients, to the
    float64 cancellation bound of the quadratic expansion: B = eps64 * max|x - c|^2 / lambda_min(Sigma), the
    rounding of the expanded x^T P x - 2 mu^T P x + mu^T P mu terms (measured: gaps of 0.001-0.35 B).

    Trajectories are not compared: Adam divides by |g| + 1e-8, so a rounding difference of 1e-14 in a gradient
    entry near zero becomes a 1e-8 difference in the step, and the two paths' histories part at that level."""
    x = demo_data["full"].data.double()
    model = gmm.make_model(family, 5, 2, dtype=torch.float64)
    model.fit(x, num_iterations=30, component_lr=0.05)
    bound = torch.finfo(torch.float64).eps * float((x - x.mean(0)).square().sum(-1).max())
    bound /= float(torch.linalg.eigvalsh(model.covariances).min())
    results = []
    for quadratic in (False, True):
        stepper = make_step(model, x, make_options(), quadratic)
        nll = float(stepper.step(0.0, 0.0))  # learning rates 0: gradients computed, parameters unchanged
        results.append((nll, [p.grad.clone() for p in stepper.params]))
    (nll_d, grads_d), (nll_q, grads_q) = results
    assert abs(nll_d - nll_q) <= 4 * bound
    for a, b in zip(grads_d, grads_q, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=4 * bound)
    assert nll_d == pytest.approx(-model.score(x), abs=1e-12)  # and the step left the parameters alone


def test_lr_schedule():
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("constant", 99, 100) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_iterations": 0}, "num_iterations must be >= 1"),
        ({"mixture_lr": -1.0}, "mixture_lr must be >= 0"),
        ({"component_lr": float("nan")}, "component_lr must be finite"),
        ({"clamp": 0.0}, "clamp must be > 0"),
        ({"init": "kmeans"}, "did you mean 'kmeans\\+\\+'"),
        ({"lr_schedule": "linear"}, "unknown lr_schedule"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_options(**kwargs)


def test_unknown_option_suggests():
    with pytest.raises(TypeError, match="did you mean 'num_iterations'"):
        make_options(num_iteration=10)
    assert make_options(FitOptions(clamp=1e-3)).clamp == 1e-3
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    for call in (lambda: gmm.GmmFull(2, 2).fit(x, num_iteration=10), lambda: gmm.fit(gmm.GmmFull(2, 2), x, clmap=1e-3)):
        with pytest.raises(TypeError, match="did you mean '(num_iterations|clamp)'"):
            call()


def test_gmm_fit_is_the_function_and_every_module_imports_by_its_name():
    assert inspect.isfunction(gmm.fit) and not Path(gmm.__file__).with_name("fit.py").exists()  # no module behind it
    for name in ("fitting", "loop", "options", "records", "recovery", "steps", "population", "optim"):
        importlib.import_module(f"gmm.{name}")


@pytest.mark.parametrize("function", [gmm.fit, gmm.MixtureModel.fit], ids=["gmm.fit", "MixtureModel.fit"])
def test_fit_signatures_list_every_option_with_the_default_of_fit_options(function):
    """The keyword-only parameters are FitOptions' fields, in order, with its defaults: they cannot drift."""
    keywords = [p for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
    fields = dataclasses.fields(FitOptions)
    assert [p.name for p in keywords] == [f.name for f in fields]
    for p, f in zip(keywords, fields, strict=True):
        assert p.default is f.default or p.default == f.default, p.name
    per_member = [p.name for p in keywords if str(p.annotation).startswith("PerMember")]
    assert sorted(per_member) == sorted(PER_MEMBER)  # typed per member exactly where a population takes B values


def test_options_override_only_where_given(demo_data):
    x = demo_data["full"].data
    model = gmm.GmmFull(5, 2)
    model.fit(x, FitOptions(num_iterations=7, clamp=1e-3), component_lr=0.02)
    opts = model.fit_result_.options
    assert (opts.num_iterations, opts.clamp, opts.component_lr) == (7, 1e-3, 0.02)


def test_a_keyword_given_overrides_options_even_at_its_default(demo_data):
    """A keyword equal to FitOptions' default is still a keyword given: it overrides `options` (model.fit and
    gmm.fit alike), and seed=0 with a generator is still refused."""
    x = demo_data["full"].data
    for fit in (lambda m, *a, **k: m.fit(*a, **k), lambda m, *a, **k: gmm.fit(m, *a, **k)):
        model = gmm.GmmFull(5, 2)
        fit(model, x, FitOptions(num_iterations=3, seed=5), num_iterations=FitOptions.num_iterations // 100, seed=0)
        assert (model.fit_result_.options.num_iterations, model.fit_result_.options.seed) == (10, 0)
        model = gmm.GmmFull(5, 2)
        fit(model, x, FitOptions(num_iterations=3, clamp=1e-3), clamp=FitOptions.clamp)
        assert model.fit_result_.options.clamp == FitOptions.clamp
        with pytest.raises(ValueError, match="not both"):
            fit(gmm.GmmFull(5, 2), x, num_iterations=2, seed=0, generator=torch.Generator().manual_seed(1))


def _steps(x: torch.Tensor) -> list:
    model = gmm.GmmFull(3, 2)
    out = [make_step(model, x, make_options(), False), make_step(model, x, make_options(batch_size=10), False)]
    out.append(make_step(gmm.GmmFull(3, 2), x, make_options(gradients="analytic"), False))
    out.append(PopulationStep(gmm.make_model("full", 3, 2, batch_shape=(2,)), x[None]))
    return out


def test_every_step_follows_the_step_protocol():
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    steps = _steps(x)
    assert all(isinstance(s, Step) for s in steps)
    assert [s.batch_size for s in steps] == [None, 10, None, None]
    assert isinstance(steps[0], AutogradStep) and isinstance(steps[1], AutogradStep)


@pytest.mark.parametrize("gradients", ["autograd", "analytic"])
def test_clamp_returns_none_when_nothing_is_below_the_floor_and_takes_a_new_floor(gradients):
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    model = gmm.GmmDiagonal(3, 2)
    opts = make_options(gradients=gradients, clamp=1e-3)
    stepper = make_step(model, x, opts, False)
    stepper.step(1e-2, 1e-2)
    assert stepper.clamp(opts.clamp) is None  # unit variances: far above the floor
    clamped, smallest = stepper.clamp(torch.tensor([10.0, 10.0]))  # a new, higher floor: applied and reported
    assert clamped.all() and bool((smallest < 1).all())
    assert bool((model.covariances.diagonal(dim1=-2, dim2=-1) >= 10.0 * (1 - 1e-6)).all())


@pytest.mark.parametrize(
    "data, match",
    [
        (torch.zeros(5), "must be 2-D .* x\\[:, None\\]"),
        (torch.zeros(0, 2), "empty"),
        (torch.tensor([[0.0, float("nan")]] * 10), "non-finite .* row 0, column 1"),
        (torch.zeros(3, 2), "3 samples but the model has 5 components"),
        (torch.zeros(10, 3), "3 dimensions but the model has num_dims=2"),
    ],
)
def test_bad_data(data, match):
    with pytest.raises(ValueError, match=match):
        gmm.GmmFull(5, 2).fit(data, num_iterations=5)


def test_bad_data_type():
    with pytest.raises(TypeError, match="torch.Tensor or a NumPy array"):
        gmm.GmmFull(2, 2).fit("not data")


def test_small_fits_run_in_one_thread_and_restore_the_setting():
    mock = gmm.generate_data(200, 3, 2, radius=5.0, family="full", seed=0)
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        gmm.fit(gmm.GmmFull(3, 2), mock.data, num_iterations=20, log_freq=10,
                callback=lambda step, nll, ev: seen.append(torch.get_num_threads()))  # fmt: skip
        assert seen == [1, 1] and torch.get_num_threads() == 2
        seen.clear()
        gmm.fit(gmm.GmmFull(3, 2), mock.data, num_iterations=20, log_freq=10, num_threads=2,
                callback=lambda step, nll, ev: seen.append(torch.get_num_threads()))  # fmt: skip
        assert seen == [2, 2]

        def interrupt(step, nll, ev):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):  # a fit that raises restores the setting too
            gmm.fit(gmm.GmmFull(3, 2), mock.data, num_iterations=20, log_freq=10, callback=interrupt)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads"):
        gmm.fit(gmm.GmmFull(3, 2), mock.data, num_iterations=5, num_threads=0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: gmm.make_model("full", 2, 2, dtype=torch.float16), "float16 is not supported; use torch.float32"),
        (lambda x: gmm.fit(gmm.GmmFull(2, 2), x, dtype=torch.bfloat16), "bfloat16 is not supported"),
        (lambda x: gmm.make_model("diagonal", 2, 2, device="meta"), "device 'meta' holds no data"),
        (lambda x: gmm.fit(gmm.GmmFull(2, 2), x, device="meta"), "device 'meta' holds no data"),
        (lambda x: gmm.fit(gmm.GmmFull(2, 2), x.to("meta")), "data device 'meta'"),
        (
            lambda x: gmm.fit(gmm.GmmFull(2, 2), x, seed=1, generator=torch.Generator().manual_seed(0)),
            "pass seed or generator, not both",
        ),
        (
            lambda x: gmm.fit(gmm.GmmFull(2, 2), x, gmm.FitOptions(seed=5, generator=torch.Generator())),
            "pass seed or generator, not both",
        ),
        (
            lambda x: gmm.fit(gmm.GmmFull(2, 2), x, gmm.FitOptions(generator=torch.Generator()), seed=5),
            "pass seed or generator, not both",
        ),
        (lambda x: fit_em(gmm.GmmDiagonal(2, 2), x, seed=3, generator=torch.Generator()), "not both"),
        (lambda x: gmm.fit(gmm.GmmFull(2, 2).to(torch.float16), x), "float16 is not supported"),
    ],
)
def test_unsupported_precision_device_and_seed_with_generator_are_one_clear_error(call, match):
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        call(x)


def test_half_precision_data_is_converted_to_the_models_dtype():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    model = gmm.GmmDiagonal(2, 2)
    result = gmm.fit(model, x.half(), num_iterations=3)
    assert model.dtype == torch.float32 and math.isfinite(result.final_nll)


def test_a_generator_alone_drives_fit_and_em():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        a, b = gmm.GmmDiagonal(2, 2), gmm.GmmDiagonal(2, 2)
        gmm.fit(a, x, num_iterations=3, generator=torch.Generator().manual_seed(7))
        fit_em(b, x, num_iterations=3, generator=torch.Generator().manual_seed(7))
        runs.append((a.means, b.means))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
