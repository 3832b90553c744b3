"""Adam with torch's fused kernel, called directly: the same arithmetic as `torch.optim.Adam(fused=True)`
without the optimizer's per-step Python bookkeeping, which dominates a step at small sizes.

`torch._fused_adam_` is a private op: kept because no public API runs the fused kernel without that
bookkeeping, and `bench/adam.py` measures the gain against `torch.optim.Adam(fused=True)` in the same run;
tests/test_optim.py fails loudly if the op disappears or changes its signature (FusedAdam would otherwise
fall back quietly to the slower foreach path)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.adam import adam as adam_functional


class FusedAdam:
    """Adam over parameter groups `[(params, lr), ...]`; `step(lrs)` applies one update with those lrs.

    Moments live in `exp_avg` / `exp_avg_sq` (one tensor per parameter), so rows can be reset in place.
    Falls back to the foreach implementation where no fused kernel exists (device or dtype), or with
    `fused=False`.
    """

    def __init__(self, groups: list[list[Tensor]], betas=(0.9, 0.999), eps: float = 1e-8, fused: bool | None = None):
        self.groups = [list(g) for g in groups]
        self.params = [p for g in self.groups for p in g]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self._hyper = dict(beta1=self.beta1, beta2=self.beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        self.exp_avg = {p: torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params}
        self.exp_avg_sq = {p: torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params}
        self._fused = hasattr(torch, "_fused_adam_") and all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in self.params
        )
        if fused is not None:  # False forces the foreach implementation (tests compare both)
            self._fused = self._fused and fused
        if self._fused and len({p.device for p in self.params}) == 1:
            # the raw fused kernel does not count steps: one shared counter, one increment per step
            self._counter = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
            self.steps = {p: self._counter for p in self.params}
        else:  # torch.optim.adam.adam counts each parameter's steps itself
            self._counter = None
            self.steps = {p: torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params}
        self._lists = [
            ([self.exp_avg[p] for p in g], [self.exp_avg_sq[p] for p in g], [self.steps[p] for p in g]) for g in self.groups
        ]
        self._all_steps = [self.steps[p] for p in self.params]

    @torch.no_grad()
    def step(self, lrs: list[float]) -> None:
        if self._counter is not None:
            self._counter.add_(1.0)
        elif self._fused:  # parameters on several devices (rare): one counter each
            for s in self._all_steps:
                s.add_(1.0)
        for group, (avgs, sqs, steps), lr in zip(self.groups, self._lists, lrs, strict=True):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            if self._fused:
                torch._fused_adam_(group, grads, avgs, sqs, [], steps, lr=lr, **self._hyper)
            else:  # increments `steps` itself
                adam_functional(group, grads, avgs, sqs, [], steps, lr=lr, foreach=True, capturable=False,
                                differentiable=False, fused=None, grad_scale=None, found_inf=None,
                                has_complex=False, decoupled_weight_decay=False, **self._hyper)  # fmt: skip

    @torch.no_grad()
    def restart(self) -> None:
        """Zero every moment and step count: the next step is Adam's first from the current parameters."""
        counters = {id(s): s for s in self.steps.values()}  # the fused kernel's one shared counter, once
        for t in (*self.exp_avg.values(), *self.exp_avg_sq.values(), *counters.values()):  # rare: spike rollbacks
            t.zero_()

    @torch.no_grad()
    def reset_rows(self, params: list[Tensor], rows: Tensor) -> None:
        """Zero the moments of `rows` (first dimension) of each of `params`."""
        for p in params:
            self.exp_avg[p][rows] = 0
            self.exp_avg_sq[p][rows] = 0


class PopulationAdam:
    """Adam for B independent models whose parameters share a leading member dimension (gmm.population).

    Per member: its own learning rate (a (B,) tensor per group at each step), step count, restart and row
    resets, so a member can be frozen (learning rate 0), rolled back or reset without touching the others.
    The arithmetic is torch's Adam (bias-corrected moments, eps outside the square root); the update of
    member b depends only on member b's gradient.

    The update is seven `torch._foreach_*` calls over all parameters (private ops, as torch.optim's foreach
    Adam uses them), and while every member is at the same step count (no member restarted alone) the bias
    corrections are Python floats: 49 us a step instead of 81 at B = 10, K = 5, D = 2 (`bench/adam.py`), the
    same numbers bit for bit (tests/test_optim.py).
    """

    def __init__(self, groups: list[list[Tensor]], num_members: int, betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups = [list(g) for g in groups]
        self.params = [p for g in self.groups for p in g]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = {p: torch.zeros_like(p) for p in self.params}
        self.exp_avg_sq = {p: torch.zeros_like(p) for p in self.params}
        device = self.params[0].device
        # the step count of every member while they agree (the common case: no member restarted alone), else
        # None and `steps` holds each member's; `steps` is only kept up to date then
        self._count: int | None = 0
        self.steps = torch.zeros(num_members, dtype=torch.float64, device=device)
        self._shapes = {p: (num_members,) + (1,) * (p.ndim - 1) for p in self.params}

    def _corrections(self) -> tuple[float | Tensor, float | Tensor]:
        """(eps c2, c2 / c1) of Adam's bias corrections c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t) at the new step
        t: Python floats while every member is at the same t, else (B,) float64 tensors."""
        if self._count is not None:
            self._count += 1
            bias1 = 1.0 - self.beta1**self._count
            bias2_sqrt = math.sqrt(1.0 - self.beta2**self._count)
            return self.eps * bias2_sqrt, bias2_sqrt / bias1
        self.steps.add_(1.0)
        bias1 = 1.0 - self.beta1**self.steps  # (B,) float64
        bias2_sqrt = (1.0 - self.beta2**self.steps).sqrt_()
        return self.eps * bias2_sqrt, bias2_sqrt / bias1

    @torch.no_grad()
    def step(self, lrs: list[Tensor]) -> None:
        """One update; `lrs[g]` is the (B,) learning rate of each member for group g (0 freezes it)."""
        eps, factor = self._corrections()
        dtype = self.params[0].dtype
        per_eps = isinstance(eps, Tensor)
        if per_eps:
            eps = eps.to(dtype)
        # p -= lr/c1 m / (sqrt(v)/c2 + eps) = m / ((sqrt(v) + eps c2) / (lr c2 / c1)): one per-member divisor
        params, grads, avgs, sqs, divisors, eps_views = [], [], [], [], [], []
        for group, lr in zip(self.groups, lrs, strict=True):
            per_member = (lr.to(torch.float64) * factor).to(dtype)
            for p in group:
                if p.grad is None:
                    continue
                shape = self._shapes[p]
                params.append(p)
                grads.append(p.grad)
                avgs.append(self.exp_avg[p])
                sqs.append(self.exp_avg_sq[p])
                divisors.append(per_member.view(shape))
                if per_eps:
                    eps_views.append(eps.view(shape))
        if not params:
            return
        torch._foreach_lerp_(avgs, grads, 1.0 - self.beta1)
        torch._foreach_mul_(sqs, self.beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1.0 - self.beta2)
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_add_(denom, eps_views if per_eps else eps)
        torch._foreach_div_(denom, divisors)
        torch._foreach_addcdiv_(params, avgs, denom, value=-1.0)

    @torch.no_grad()
    def restart(self, member: int | slice) -> None:
        """Zero member's moments and step count (every member's for `slice(None)`): its next step is Adam's first
        from its current parameters."""
        for p in self.params:
            self.exp_avg[p][member] = 0
            self.exp_avg_sq[p][member] = 0
        if (isinstance(member, slice) and member == slice(None)) or len(self.steps) == 1:
            self._count = 0  # every member restarts: the counts agree again
            return
        if self._count is not None:  # one member restarts alone: from now on each member has its own count
            self.steps.fill_(self._count)
            self._count = None
        self.steps[member] = 0

    @torch.no_grad()
    def reset_rows(self, params: list[Tensor], member: int | slice, rows: Tensor) -> None:
        """Zero the moments of `rows` (the component dimension) of `member` (or a slice of members) in each of
        `params`."""
        for p in params:
            self.exp_avg[p][member, rows] = 0
            self.exp_avg_sq[p][member, rows] = 0
