"""gmm.optim.FusedAdam against torch.optim.Adam: the same updates, fused kernel or foreach fallback."""

from __future__ import annotations

import pytest
import torch

from gmm.optim import FusedAdam


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)]  # fmt: skip


def _loss(params: list[torch.Tensor]) -> torch.Tensor:
    a, b = params
    return (a.sin() ** 2).sum() + (b.exp() * b).sum()


@pytest.mark.parametrize("fused", [True, False])
def test_fused_adam_matches_torch_adam(fused):
    ours, ref = _params(0), _params(0)
    opt = FusedAdam([[ours[0]], [ours[1]]], fused=fused)  # False: the fallback where no fused kernel exists
    assert opt._fused == fused
    torch_opt = torch.optim.Adam([{"params": [ref[0]], "lr": 1e-2}, {"params": [ref[1]], "lr": 3e-2}])
    for step in range(25):
        lrs = [1e-2 * (1 - step / 50), 3e-2 * (1 - step / 50)]
        for group, lr in zip(torch_opt.param_groups, lrs, strict=True):
            group["lr"] = lr
        for opt_params, optimizer in ((ours, None), (ref, torch_opt)):
            for p in opt_params:
                p.grad = None
            _loss(opt_params).backward()
            if optimizer is not None:
                optimizer.step()
        opt.step(lrs)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
