"""Step functions: one Adam update of the model on the NLL of the data, the variance floor, and what the
collapse rules read (responsibility mass). `Step` is the protocol every step implements; `make_step` picks one.

- AutogradStep: NLL + autograd + torch's fused Adam, full batch or mini-batches (`batch_size`).
- gmm.scratch.ScratchStep: hand-derived gradients, the floor fused into the step.
- PopulationStep: B members at once (gmm.population); its per-member calls take a `member`.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from . import likelihood
from .model import MixtureModel, chunk_rows
from .optim import FusedAdam, PopulationAdam
from .options import FitOptions
from .validation import make_generator

log = logging.getLogger(__name__)


@runtime_checkable
class Step(Protocol):
    """What the fit loop asks of a step function (gmm.fitting, gmm.population).

    Attributes:
        batch_size: rows per mini-batch, or None for full-batch steps (also when `batch_size` >= N).
        compile_time: seconds spent compiling (0 for eager).
    """

    batch_size: int | None
    compile_time: float

    def step(self, lr_mixture: float, lr_component: float) -> Tensor:
        """The NLL of the parameters before the update (0-d; (B,) for a population); updates them."""
        ...

    def clamp(self, clamp: float | Tensor) -> tuple[Tensor, Tensor] | None:
        """Apply the variance floor `clamp` (a float, or (D,) per-axis floors; the same object at every step)
        after the update (see Family.clamp_): None if nothing was below it, else (clamped (K',) bool, smallest
        ratio variance / floor (K',) before clamping)."""
        ...

    def mass(self) -> Tensor:
        """(K,) responsibility mass sum_n p(k | x_n) of each component at the parameters of the last step."""
        ...

    def restart(self) -> None:
        """Zero every optimizer moment and step count (Adam starts afresh from the current parameters)."""
        ...

    def reset_moments(self, components: Tensor) -> None:
        """Zero the optimizer moments of `components`."""
        ...


class AutogradStep:
    """NLL + autograd + torch's fused Adam, over chunks of N so memory stays bounded.

    The `Step` protocol for one model; `batch_size` is set when mini-batches are drawn (`opts.batch_size` < N).
    """

    compile_time = 0.0

    def __init__(
        self, model: MixtureModel, x: Tensor, opts: FitOptions, quadratic: bool, generator: torch.Generator | None = None
    ):
        self.model = model
        self.num_samples = x.shape[0]
        self.quadratic = quadratic
        components = [model.locs] + ([model.raw_cov] if model.family.trainable else [])
        self.optimizer = FusedAdam([[model.logits], components])
        self.params = self.optimizer.params
        self.rows = chunk_rows(model.num_components, model.num_dims) * (4 if quadratic else 1)
        self.center = x.mean(0)
        self.batch_size = opts.batch_size if opts.batch_size and opts.batch_size < x.shape[0] else None
        if self.batch_size:  # mini-batches are drawn (and prepared) at every step
            self.x, self.generator = x, generator if generator is not None else make_generator(0)
            self.chunks = self._prepare(x[: self.batch_size])
        else:
            self.chunks = self._prepare(x)
        self.scale = -1.0 / (self.batch_size or self.num_samples)
        self.logits_before = model.logits.detach().clone()
        self._logits = model.logits.detach()  # a view: reading it costs no autograd bookkeeping
        # the clamp's check reads a detached view of the floored entries (raw is updated in place, so the
        # view stays current); clamping itself, rare, goes through Family.clamp_
        self._floor_view = model.family.floor_view(model.raw_cov.detach())
        self._floor_of: tuple[object, float | Tensor] | None = None  # (clamp, raw floor) of the last clamp call
        self._loss_fn = self._loss
        if opts.compile:
            self._compile()

    def _prepare(self, x: Tensor) -> list[Tensor]:
        """Chunks of the loss input: quadratic features, or the data with a ones column (likelihood.py)."""
        if self.quadratic:
            return [likelihood.quadratic_features(c, self.center, self.model.family.cholesky) for c in x.split(self.rows)]
        return [likelihood.augment(c) for c in x.split(self.rows)]

    def _compile(self) -> None:
        """torch.compile the chunk loss (forward and backward graphs); eager when that fails."""
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(self._loss, dynamic=False)
            compiled(self.chunks[0]).backward()  # compile now, so the loop's wall time excludes it
            self._loss_fn = compiled
        except Exception as err:  # noqa: BLE001  (any compiler failure: fall back, say so)
            log.warning("torch.compile failed (%s: %s); running eagerly", type(err).__name__, err)
        finally:
            for p in self.params:
                p.grad = None
        self.compile_time = time.perf_counter() - t0

    def _loss(self, chunk: Tensor) -> Tensor:
        m = self.model
        if not self.quadratic:
            return likelihood.mixture_nll_sum(chunk, m.logits, m.locs, m.raw_cov, m.family, self.scale, augmented=True)
        joint = chunk @ likelihood.quadratic_weights(m.logits, m.locs, m.covariance(), self.center)
        return likelihood.logsumexp(joint).sum() * self.scale

    def step(self, lr_mixture: float, lr_component: float) -> Tensor:
        for p in self.params:
            p.grad = None
        if self.batch_size:
            rows = torch.randint(self.num_samples, (self.batch_size,), generator=self.generator)
            self.chunks = self._prepare(self.x[rows.to(self.x.device)])
        if len(self.chunks) == 1:
            loss = self._loss_fn(self.chunks[0])
            loss.backward()
            nll = loss.detach()
        else:
            nll = torch.zeros((), dtype=torch.float64, device=self.model.device)
            for chunk in self.chunks:
                loss = self._loss_fn(chunk)
                loss.backward()
                nll += loss.detach()
        self.logits_before.copy_(self._logits)
        self.optimizer.step([lr_mixture, lr_component])
        return nll

    def clamp(self, clamp: float | Tensor) -> tuple[Tensor, Tensor] | None:
        """Apply the variance floor after the update: None when nothing was below it, else
        (clamped (K',) bool, smallest variance (K',) before clamping)."""
        if self._floor_of is None or self._floor_of[0] is not clamp:
            self._floor_of = (clamp, self.model.family.raw_floor(clamp))
        floor = self._floor_of[1]
        # the common case, nothing below the floor: one reduction on a detached view, no autograd
        if isinstance(floor, float):
            if not bool(self._floor_view.amin() < floor):
                return None
        elif not bool((self._floor_view < floor).any()):
            return None
        return self.model.family.clamp_(self.model.raw_cov, clamp)

    def mass(self) -> Tensor:
        """(K,) sum_n p(k | x_n) at the parameters of the last step, from the logit gradient."""
        grad = self.model.logits.grad.detach()  # d mean-NLL / d logit_k = pi_k - mean_n p(k | x_n)
        return (torch.softmax(self.logits_before, -1) - grad) * self.num_samples  # a batch's, scaled to N

    def restart(self) -> None:
        self.optimizer.restart()

    def reset_moments(self, components: Tensor) -> None:
        m = self.model
        per_component = [m.logits, m.locs] + ([m.raw_cov] if m.family.trainable and not m.family.shared else [])
        self.optimizer.reset_rows(per_component, components)


def make_step(
    model: MixtureModel,
    x: Tensor,
    opts: FitOptions,
    quadratic: bool,
    generator: torch.Generator | None = None,
    clamp: float | Tensor | None = None,
) -> Step:
    """The step function for `opts.gradients` / `opts.compile` (`generator` draws mini-batches; `clamp` is the
    floor the analytic step fuses in, default `opts.clamp`)."""
    if opts.gradients == "analytic":
        if opts.batch_size:
            raise ValueError("batch_size needs gradients='autograd'; drop batch_size or use autograd gradients")
        from . import scratch  # noqa: PLC0415  (optional path, imported only when asked)

        return scratch.make_step(model, x, opts, quadratic, clamp)
    return AutogradStep(model, x, opts, quadratic, generator)


class PopulationStep:
    """NLL + autograd + PopulationAdam for B members at once, chunked over N (gmm.population).

    The loss is sum_b NLL_b: member b's gradient is the gradient of its own mean NLL, so Adam's update of each
    member is the one it would get alone. The `Step` protocol with a member dimension: learning rates are (B,)
    tensors, `step` returns (B,) NLLs, `clamp` gives (B, K') tensors, `mass` (B, K); `restart` and
    `reset_moments` act on one `member` (all of them when None).
    """

    batch_size = None  # full-batch steps only
    compile_time = 0.0

    def __init__(self, model: MixtureModel, z: Tensor):
        self.model = model
        self.num_samples = z.shape[1]
        trainable = [model.raw_cov] if model.family.trainable else []
        self.optimizer = PopulationAdam([[model.logits], [model.locs, *trainable]], model.num_members)
        self.params = self.optimizer.params
        self.chunks = z.split(chunk_rows(model.num_components * model.num_members, model.num_dims), dim=1)
        self.chunks_t = [c.transpose(1, 2).contiguous() for c in self.chunks]  # (B or 1, D, n): N innermost
        self.scale = -1.0 / self.num_samples
        self.logits_before = model.logits.detach().clone()
        self.floor_view = model.family.floor_view(model.raw_cov.detach())  # (B, K', m): the entries the floor acts on
        self._floor_of: tuple[Tensor, Tensor] | None = None  # (clamp, raw floor) of the last clamp call
        self.work = likelihood.Workspace()  # the NLL's large intermediates, reused from step to step

    def nll(self) -> Tensor:
        """(B,) float64 mean NLL of every member's current parameters, without gradients."""
        m = self.model
        with torch.no_grad():  # the step's own arithmetic: a member's value does not depend on B
            cov = m.covariance()
            parts = [likelihood.batched_mixture_nll(c, m.logits, m.locs, cov, self.scale, self.work) for c in self.chunks_t]
        return parts[0].double() if len(parts) == 1 else sum(p.double() for p in parts)

    def step(self, lr_mixture: Tensor, lr_component: Tensor) -> Tensor:
        """(B,) NLLs of the parameters before the update; updates them with per-member learning rates."""
        m = self.model
        for p in self.params:
            p.grad = None
        values = None
        for chunk in self.chunks_t:
            per = likelihood.batched_mixture_nll(chunk, m.logits, m.locs, m.covariance(), self.scale, self.work)  # (B,)
            per.sum().backward()
            values = per.detach() if values is None else values.double() + per.detach()
        self.logits_before.copy_(m.logits.detach())
        self.optimizer.step([lr_mixture, lr_component])
        return values

    def clamp(self, clamp: Tensor) -> tuple[Tensor, Tensor] | None:
        """The variance floor `clamp` ((B, 1, D), the same object at every step) after the update: None when no
        member was below it, else (clamped (B, K') bool, smallest variance / floor (B, K'))."""
        if self._floor_of is None or self._floor_of[0] is not clamp:
            self._floor_of = (clamp, self.model.family.raw_floor(clamp))
        if not bool((self.floor_view < self._floor_of[1]).any()):
            return None
        return self.model.family.clamp_(self.model.raw_cov, clamp)

    def mass(self) -> Tensor:
        """(B, K) sum_n p(k | x_n) of every member at the parameters of the last step, from the logit gradient."""
        grad = self.model.logits.grad.detach()
        return (torch.softmax(self.logits_before, -1) - grad) * self.num_samples

    def restart(self, member: int | None = None) -> None:
        self.optimizer.restart(slice(None) if member is None else member)

    def reset_moments(self, components: Tensor, member: int | None = None) -> None:
        m = self.model
        per_component = [m.logits, m.locs] + ([m.raw_cov] if m.family.trainable and not m.family.shared else [])
        self.optimizer.reset_rows(per_component, slice(None) if member is None else member, components)
