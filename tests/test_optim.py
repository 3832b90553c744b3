"""gmm.optim.FusedAdam against torch.optim.Adam: the same updates, fused kernel or foreach fallback; the private
torch ops the fit relies on, checked loudly."""

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


PRIVATE = (
    "torch changed or dropped {op}, a private op gmm relies on ({why}); the fit would {then}. Port {where} to the "
    "op's new signature, or to the public API if the benchmark no longer shows a gain"
)


def _call_private(op: str, call, **why_then_where) -> str:
    """Call `call` (which uses torch.<op>), failing with the PRIVATE message if the op is gone or its call fails."""
    message = PRIVATE.format(op=f"torch.{op}", **why_then_where)
    assert hasattr(torch, op), message
    try:
        call()
    except (TypeError, RuntimeError) as err:
        pytest.fail(f"{message}: {type(err).__name__}: {err}")
    return message


def test_the_private_fused_adam_op_is_there_with_the_signature_fused_adam_calls():
    ours, ref = _params(1), _params(1)
    for params in (ours, ref):
        _loss(params).backward()
    optimizer = FusedAdam([ours])
    why = "gmm.optim.FusedAdam: +27-31% per small step over torch.optim.Adam(fused=True), python -m bench.run --only adam"
    message = _call_private(
        "_fused_adam_", lambda: optimizer.step([1e-2]), why=why, then="fall back quietly to the slower foreach Adam",
        where="gmm/optim.py",
    )  # fmt: skip
    assert optimizer._fused, message
    torch.optim.Adam(ref, lr=1e-2).step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=message)


def test_the_private_foreach_copy_op_copies_every_tensor():
    sources = [torch.randn(3), torch.randn(2, 2, dtype=torch.float64)]
    targets = [torch.empty_like(t) for t in sources]
    why = "the per-step snapshot of gmm.recovery.Iterates.save and gmm.population, one dispatch for every parameter"
    message = _call_private(
        "_foreach_copy_", lambda: torch._foreach_copy_(targets, sources), why=why, then="fail at its first step",
        where="those two calls",
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(targets, sources, strict=True)), message
