"""Standardized coordinates for `gmm.fit`: learning rates in units of the data's spread, not of its units.

Adam moves a parameter by about its learning rate per step whatever the gradient's size, so in data units a
mean moves ~`component_lr` metres or micrometres per step alike. The fit therefore runs on

    z = (x - shift) / scale,     shift = mean(x) (D,),   scale = std(x) per axis (D,), or one RMS std for all axes,

and maps the model there and back. Gaussian mixtures are affine-equivariant: with S = diag(scale), a component
(mu, Sigma) in data units is (S^-1 (mu - shift), S^-1 Sigma S^-1) in z, responsibilities are unchanged, and

    NLL_x = NLL_z + sum_j log scale_j        (exactly: the log-determinant of the map).

A family says which scalings keep it (`Family.scaling`): full, tied and diagonal take a scale per axis;
isotropic, shared_isotropic and constant (one variance for all axes) take one scale, the root mean square of
the per-axis stds. An axis without spread keeps scale 1.

The clamp stays a variance floor in the data's units: on axis j of z it is clamp / scale_j^2, so after the
fit maps back every diagonal element of every covariance is >= clamp in data units (the data-unit floor is
applied once more at that point, which only absorbs rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import MixtureModel


class Standardizer:
    """The map between data units and the fit's standardized coordinates for one model and data set.

    Attributes:
        shift, scale: (D,) in the model's dtype and device (scale 1 and shift 0 for `identity`).
        log_det: sum_j log scale_j (float); NLL in data units = NLL in z + log_det.
    """

    def __init__(self, shift: Tensor, scale: Tensor):
        self.shift, self.scale = shift, scale
        self.log_det = float(scale.double().log().sum())
        self.identity = bool((shift == 0).all() and (scale == 1).all())
        self._fixed_raw: Tensor | None = None

    @classmethod
    def of(cls, x: Tensor, model: MixtureModel, enabled: bool = True) -> Standardizer:
        """The standardizer of data `x` (N, D) for `model`'s family (identity when not `enabled`)."""
        d = x.shape[1]
        if not enabled:
            ones = torch.ones(d, dtype=x.dtype, device=x.device)
            return cls(torch.zeros_like(ones), ones)
        mean = sum(c.double().sum(0) for c in x.split(1 << 16)) / x.shape[0]
        var = sum((c.double() - mean).square().sum(0) for c in x.split(1 << 16)) / x.shape[0]
        if model.family.scaling == "scalar":
            var = var.mean().expand(d)
        std = var.sqrt()
        # an axis without spread (or too little to divide by) keeps its units
        tiny = torch.finfo(x.dtype).tiny ** 0.25
        std = torch.where(torch.isfinite(std) & (std > tiny), std, torch.ones_like(std))
        return cls(mean.to(x.dtype), std.to(x.dtype))

    def data(self, x: Tensor) -> Tensor:
        """(N, D) data -> z (a new tensor; `x` itself when identity)."""
        return x if self.identity else (x - self.shift) / self.scale

    def clamp(self, clamp: float) -> float | Tensor:
        """The variance floor in z: (D,) clamp / scale_j^2 (the float `clamp` itself when identity)."""
        if self.identity:
            return clamp
        return (clamp / self.scale.double().square()).to(self.scale.dtype)

    @torch.no_grad()
    def to_standard_(self, model: MixtureModel) -> None:
        """In place: `model`'s parameters from data units to z (weights are unchanged)."""
        if self.identity:
            return
        model.locs.sub_(self.shift).div_(self.scale)
        if not model.family.trainable:  # a fixed covariance comes back bit for bit
            self._fixed_raw = model.raw_cov.detach().clone()
        model.family.rescale_(model.raw_cov.detach(), self.scale)

    @torch.no_grad()
    def to_data_(self, model: MixtureModel, clamp: float) -> None:
        """In place: `model`'s parameters from z back to data units, then the data-unit floor `clamp`."""
        if self.identity:
            return
        model.locs.mul_(self.scale).add_(self.shift)
        if self._fixed_raw is not None:
            model.raw_cov.copy_(self._fixed_raw)
        else:
            model.family.rescale_(model.raw_cov.detach(), self.scale.reciprocal())
        model.family.clamp_(model.raw_cov.detach(), clamp)
