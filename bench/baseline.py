"""The original project's fit, rewritten only as far as needed to time it (kylesayrs/GMMPytorch style).

Every step rebuilds `torch.distributions.MixtureSameFamily`, Adam runs on two parameter groups with
cosine annealing, and a Python loop over components clamps each Cholesky diagonal afterwards. This is
the baseline the benchmark's ratios are measured against; it is not part of the library.
"""

from __future__ import annotations

import torch
from torch import nn


class _Original(nn.Module):
    """The original's start: equal weights, means at K data points drawn with a seeded generator."""

    def __init__(self, num_components: int, data: torch.Tensor, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(data.shape[0], generator=g)[:num_components]
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.mus = nn.Parameter(data[idx].clone())


class OriginalFull(_Original):
    def __init__(self, num_components: int, num_dims: int, data: torch.Tensor, seed: int = 0):
        super().__init__(num_components, data, seed)
        self.scale_tril = nn.Parameter(torch.eye(num_dims).repeat(num_components, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = torch.distributions.Categorical(logits=self.logits)
        comp = torch.distributions.MultivariateNormal(self.mus, scale_tril=self.scale_tril)
        return -torch.distributions.MixtureSameFamily(mix, comp).log_prob(x).mean()

    @torch.no_grad()
    def constrain_parameters(self, epsilon: float = 1e-6) -> None:
        for tril in self.scale_tril:  # the original's Python loop over components
            tril.copy_(torch.tril(tril))
            tril.diagonal().abs_()
            tril.diagonal().clamp_min_(epsilon)


class OriginalDiagonal(_Original):
    """The original's diagonal model: `Independent(Normal(mu, std), 1)` components rebuilt every step, std
    parameters clamped by a Python loop over components."""

    def __init__(self, num_components: int, num_dims: int, data: torch.Tensor, seed: int = 0):
        super().__init__(num_components, data, seed)
        self.stds = nn.Parameter(torch.ones(num_components, num_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = torch.distributions.Categorical(logits=self.logits)
        comp = torch.distributions.Independent(torch.distributions.Normal(self.mus, self.stds), 1)
        return -torch.distributions.MixtureSameFamily(mix, comp).log_prob(x).mean()

    @torch.no_grad()
    def constrain_parameters(self, epsilon: float = 1e-6) -> None:
        for std in self.stds:  # the original's Python loop over components
            std.abs_()
            std.clamp_min_(epsilon)


ORIGINAL = {"full": OriginalFull, "diagonal": OriginalDiagonal}


def make_fit(model: nn.Module, x: torch.Tensor, num_iterations: int, mixture_lr=3e-5, component_lr=1e-2):
    """A closure running one original-style step per call."""
    optimizer = torch.optim.Adam(
        [
            {"params": [model.logits], "lr": mixture_lr},
            {"params": [p for name, p in model.named_parameters() if name != "logits"], "lr": component_lr},
        ]
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_iterations)

    def step() -> float:
        optimizer.zero_grad()
        loss = model(x)
        loss.backward()
        optimizer.step()
        scheduler.step()
        model.constrain_parameters()
        return loss

    return step
