"""gmm.optim.FusedAdam against torch.optim.Adam: the same updates, fused kernel or foreach fallback; the private
torch ops the fit relies on, checked loudly."""

from __future__ import annotations

import pytest
import torch

from gmm.optim import FusedAdam, PopulationAdam


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


def test_population_adam_is_each_members_torch_adam_also_after_one_member_restarts():
    # PopulationAdam (foreach calls; Python-float bias corrections while the members' step counts agree, (B,)
    # tensors after one member restarts alone): member b's update is torch.optim.Adam's on member b alone
    members = 3
    g = torch.Generator().manual_seed(2)
    start = [
        torch.randn(members, 4, generator=g, dtype=torch.float64),
        torch.randn(members, 3, 2, generator=g, dtype=torch.float64),
    ]
    ours = [t.clone().requires_grad_() for t in start]
    why = "gmm.optim.PopulationAdam: 1.5x per step over per-tensor public ops, python -m bench.run --only adam"
    opt = PopulationAdam([[ours[0]], [ours[1]]], members)
    lrs = [torch.tensor([1e-2, 2e-2, 0.0], dtype=torch.float64), torch.tensor([3e-2, 1e-2, 5e-2], dtype=torch.float64)]
    refs, torch_opts = [], []
    for b in range(members):
        ref = [start[0][b].clone().requires_grad_(), start[1][b].clone().requires_grad_()]
        refs.append(ref)
        torch_opts.append(
            torch.optim.Adam([{"params": [ref[0]], "lr": float(lrs[0][b])}, {"params": [ref[1]], "lr": float(lrs[1][b])}])
        )
    for step in range(20):
        if step == 10:  # member 1 rolls back alone: its next step is Adam's first, the others go on
            opt.restart(1)
            torch_opts[1] = torch.optim.Adam(
                [{"params": [refs[1][0]], "lr": float(lrs[0][1])}, {"params": [refs[1][1]], "lr": float(lrs[1][1])}]
            )
        for p in ours:
            p.grad = None
        sum(_loss([ours[0][b], ours[1][b]]) for b in range(members)).backward()
        message = _call_private(
            "_foreach_addcdiv_", lambda: opt.step(lrs), why=why, then="fail at its first step", where="gmm/optim.py"
        )
        for b in range(members):
            for p in refs[b]:
                p.grad = None
            _loss(refs[b]).backward()
            torch_opts[b].step()
    for b in range(members):
        for a, r in zip((ours[0][b], ours[1][b]), refs[b], strict=True):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=message)
