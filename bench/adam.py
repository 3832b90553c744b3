"""The private fused-Adam call (gmm.optim.FusedAdam: `torch._fused_adam_`) against the public
`torch.optim.Adam(fused=True)`, timed in the same run: the gain that keeps the private op (issue 17). Then the
population optimizer (gmm.optim.PopulationAdam: `torch._foreach_*` calls, Python-float bias corrections) against
the same arithmetic in public per-tensor ops, a step alone at B = 10 and 32: the gain that keeps those.

    python -m bench.adam            # 9 interleaved rounds of 400 iterations per variant
    python -m bench.adam --quick    # 3 rounds of 200

Both variants run the whole `gmm.fit` loop on the small problem (N=1000, K=5, D=2, full, float32, one thread)
from the same start; only the optimizer differs (the public one behind FusedAdam's interface). A variant's
figure is the median over rounds of its ms per iteration (FitResult.wall_time), the ratio the median over
rounds of (public block / private block). The two histories agree to rounding (checked and printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

import gmm
import gmm.optim
import gmm.steps

NUM_SAMPLES, NUM_COMPONENTS, NUM_DIMS = 1000, 5, 2
MIXTURE_LR, COMPONENT_LR = 3e-5, 1e-2  # the demo's defaults, as bench.small


class TorchAdam:
    """torch.optim.Adam(fused=True) behind FusedAdam's interface (step(lrs) with one lr per group)."""

    def __init__(self, groups: list[list[torch.Tensor]]):
        self.params = [p for g in groups for p in g]
        self.optimizer = torch.optim.Adam([{"params": list(g)} for g in groups], fused=True)

    def step(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.optimizer.step()

    def restart(self) -> None:
        raise NotImplementedError("the benchmark's fits must not roll back (pick rates without NLL spikes)")

    def reset_rows(self, params, rows) -> None:
        raise NotImplementedError("the benchmark's fits must not reset a component (pick well separated data)")


def _fit(x: torch.Tensor, iterations: int, public: bool) -> gmm.FitResult:
    saved = gmm.steps.FusedAdam
    if public:
        gmm.steps.FusedAdam = TorchAdam
    try:
        model = gmm.GmmFull(NUM_COMPONENTS, NUM_DIMS)
        model.fit(x, num_iterations=iterations, mixture_lr=MIXTURE_LR, component_lr=COMPONENT_LR, seed=42, num_threads=1)
        return model.fit_result_
    finally:
        gmm.steps.FusedAdam = saved


class PerTensorPopulationAdam(gmm.optim.PopulationAdam):
    """PopulationAdam's arithmetic in public per-tensor ops and (B,) tensor bias corrections (what it was before
    the foreach calls)."""

    @torch.no_grad()
    def step(self, lrs: list[torch.Tensor]) -> None:
        self.steps.add_(1.0)
        bias1 = 1.0 - self.beta1**self.steps
        bias2_sqrt = (1.0 - self.beta2**self.steps).sqrt_()
        dtype = self.params[0].dtype
        eps = (self.eps * bias2_sqrt).to(dtype)
        for group, lr in zip(self.groups, lrs, strict=True):
            per_member = (lr.to(torch.float64) * bias2_sqrt / bias1).to(dtype)
            for p in group:
                m, v, shape = self.exp_avg[p], self.exp_avg_sq[p], self._shapes[p]
                m.lerp_(p.grad, 1.0 - self.beta1)
                v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1.0 - self.beta2)
                denom = v.sqrt().add_(eps.view(shape)).div_(per_member.view(shape))
                p.addcdiv_(m, denom, value=-1.0)


def _population_adam(members: int, steps: int, cls) -> tuple[float, list[torch.Tensor]]:
    """(us per step, the parameters after `steps` steps) of `cls` on a full-family population's parameter shapes."""
    g = torch.Generator().manual_seed(0)
    shapes = [(members, NUM_COMPONENTS), (members, NUM_COMPONENTS, NUM_DIMS), (members, NUM_COMPONENTS, NUM_DIMS, NUM_DIMS)]
    params = [torch.randn(s, generator=g) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    lrs = [torch.full((members,), MIXTURE_LR, dtype=torch.float64), torch.rand(members, generator=g, dtype=torch.float64)]
    opt = cls([[params[0]], params[1:]], members)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(lrs)
    return 1e6 * (time.perf_counter() - t0) / steps, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter blocks")
    args = parser.parse_args(argv)
    rounds, block = (3, 200) if args.quick else (9, 400)
    warnings.filterwarnings("ignore", category=gmm.ConvergenceWarning)
    x = gmm.generate_data(NUM_SAMPLES, NUM_COMPONENTS, NUM_DIMS, 8.0, "full", seed=42).data
    for public in (False, True):  # warm-up
        _fit(x, 50, public)
    private, public, ratios = [], [], []
    for _ in range(rounds):
        ours, theirs = _fit(x, block, False), _fit(x, block, True)
        private.append(1000 * ours.wall_time / ours.num_iterations)
        public.append(1000 * theirs.wall_time / theirs.num_iterations)
        ratios.append(public[-1] / private[-1])
    diff = float((ours.nll_history - theirs.nll_history).abs().max())
    print(f"Adam in the fit loop: N={NUM_SAMPLES}, K={NUM_COMPONENTS}, D={NUM_DIMS}, full, float32, 1 thread; "
          f"medians of {rounds} interleaved rounds of {block} iterations")  # fmt: skip
    print(f"{'variant':<38} {'ms/iter':>8}")
    print(f"{'torch.optim.Adam(fused=True) (public)':<38} {statistics.median(public):8.3f}")
    print(f"{'torch._fused_adam_ (gmm.optim)':<38} {statistics.median(private):8.3f}")
    ratio = statistics.median(ratios)
    print(f"ratio public / private: {ratio:.2f}x ({100 * (ratio - 1):+.0f}% time per iteration with the public optimizer)")
    print(f"NLL histories agree: max |diff| = {diff:.2e} over {block} steps")
    torch.set_num_threads(1)
    same = True
    print(f"\nPopulation Adam, one step alone (K={NUM_COMPONENTS}, D={NUM_DIMS}, full's shapes, float32, 1 thread; "
          f"medians of {rounds} interleaved rounds of {5 * block} steps)")  # fmt: skip
    for members in (10, 32):
        ours, theirs = [], []
        for _ in range(rounds):
            t_ours, p_ours = _population_adam(members, 5 * block, gmm.optim.PopulationAdam)
            t_theirs, p_theirs = _population_adam(members, 5 * block, PerTensorPopulationAdam)
            ours.append(t_ours)
            theirs.append(t_theirs)
            same = same and all(torch.equal(a, b) for a, b in zip(p_ours, p_theirs, strict=True))
        a, b = statistics.median(theirs), statistics.median(ours)
        print(f"B={members:<3} per-tensor public ops {a:6.1f} us, foreach (gmm.optim) {b:6.1f} us: {a / b:.2f}x")
    print(f"the same parameters bit for bit: {same}")
    return 0 if diff < 1e-4 and same else 1


if __name__ == "__main__":
    sys.exit(main())
