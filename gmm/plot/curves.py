"""Curves over the steps of a fit: the mean NLL (with resets and reference lines) and each component's
smallest variance (with the floor, clamps and resets)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from numbers import Real

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from .figure import component_colors, finish, plain_power_labels, target


def plot_nll_curve(
    history,
    events=None,
    ax: Axes | None = None,
    *,
    log_x: bool = False,
    reference: Mapping[str, float] | float | None = None,
    show: bool = False,
) -> Figure:
    """Mean NLL against step, with vertical markers at component resets and optional reference lines.

    Args:
        history: one curve, or several to overlay:
            - a (T + 1,) sequence/tensor/array of NLLs (entry t after t updates, e.g.
              `FitResult.nll_history`), or a `gmm.FitResult` (its history and, when `events` is None,
              its events);
            - a dict name -> one of those, or a list of them (named "run 0", "run 1", ...), or a 2-D array
              (one curve per row).
        events: the fit's events (`FitResult.events`; those with kind == "reset" are marked by dashed
            vertical lines at their step). With several curves: a dict name -> events. FitResults
            carry their own events.
        ax: axes to draw on; default a new figure.
        log_x: symmetric-log x axis (linear in [0, 1], logarithmic beyond, so step 0 stays visible).
        reference: horizontal lines, a dict label -> NLL (e.g. {"EM": 3.61, "truth": 3.65}) or one number.
        show: display the figure with pyplot (blocks); default False.

    Returns:
        The figure holding `ax`.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an empty or non 1-D history, or events given as a flat list for several curves.
    """
    curves = _curves(history, events)
    fig, ax = target(ax, show)
    palette = component_colors(max(1, len(curves)))
    for (name, values, evs), color in zip(curves, palette, strict=True):
        _draw_curve(ax, name, values, evs, color)
    for j, (name, value) in enumerate(_references(reference).items()):
        ax.axhline(
            value,
            color=("0.2", "0.45", "0.65")[j % 3],
            linestyle=("-.", ":", (0, (5, 1)))[j % 3],
            linewidth=1.2,
            label=f"{name}: {value:.4f}",
        )
    if log_x:
        ax.set_xscale("symlog", linthresh=1.0)
        plain_power_labels(ax.xaxis)
    ax.set_xlim(left=0)
    ax.set_xlabel("step (updates)" + (", symmetric log scale" if log_x else ""))
    ax.set_ylabel("mean NLL (nats per sample)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return finish(fig, show)


def _draw_curve(ax: Axes, name: str | None, values: np.ndarray, events: list[tuple[int, str]], color) -> None:
    """One NLL curve and a dashed vertical line at each of its reset steps."""
    ax.plot(np.arange(len(values)), values, color=color, linewidth=1.5, label=name)
    resets = sorted({int(e_step) for e_step, kind in events if kind == "reset"})
    for j, step in enumerate(resets):
        ax.axvline(
            step,
            color=color,
            linestyle="--",
            linewidth=0.8,
            alpha=0.6,
            label=(f"resets ({name})" if name else "resets") if j == 0 else None,
        )


def _is_fit_result(obj) -> bool:
    from .. import FitResult  # the public name, wherever the fit module lives

    return isinstance(obj, FitResult)


def _history_array(values, name: str) -> np.ndarray:
    if _is_fit_result(values):
        values = values.nll_history
    if isinstance(values, Tensor):
        arr = values.detach().cpu().double().numpy()
    elif isinstance(values, np.ndarray | list | tuple):
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of numbers; could not convert it") from None
    else:
        raise TypeError(f"{name} must be a tensor, array, list of NLLs or a gmm.FitResult; got {type(values).__name__}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of NLLs (T + 1,); got shape {arr.shape}")
    return arr


def _event_pairs(events, name: str) -> list[tuple[int, str]]:
    """(step, kind) of each event: FitEvent objects or dicts with 'step' and 'kind'."""
    if events is None:
        return []
    if not isinstance(events, Iterable) or isinstance(events, str | Mapping):
        raise TypeError(f"events for {name} must be a sequence of FitEvent; got {type(events).__name__}")
    pairs = []
    for e in events:
        if isinstance(e, Mapping):
            pairs.append((int(e["step"]), str(e["kind"])))
        elif hasattr(e, "step") and hasattr(e, "kind"):
            pairs.append((int(e.step), str(e.kind)))
        else:
            raise TypeError(f"events for {name} must be FitEvent objects (step, kind); got {type(e).__name__}")
    return pairs


def _is_single(history) -> bool:
    if _is_fit_result(history):
        return True
    if isinstance(history, Tensor | np.ndarray):
        return history.ndim <= 1
    if isinstance(history, list | tuple):
        return all(isinstance(v, Real) or (isinstance(v, Tensor | np.ndarray) and v.ndim == 0) for v in history)
    return False


def _curves(history, events) -> list[tuple[str | None, np.ndarray, list[tuple[int, str]]]]:
    """Normalize `history`/`events` into [(name, values (T+1,), [(step, kind), ...]), ...]."""
    if _is_single(history):
        evs = events if events is not None else (history.events if _is_fit_result(history) else None)
        return [(None, _history_array(history, "history"), _event_pairs(evs, "history"))]
    if isinstance(history, Mapping):
        named = [(str(k), v) for k, v in history.items()]
    elif isinstance(history, Tensor | np.ndarray):
        named = [(f"run {i}", row) for i, row in enumerate(history)]
    elif isinstance(history, list | tuple):
        named = [(f"run {i}", v) for i, v in enumerate(history)]
    else:
        raise TypeError(
            f"history must be an NLL sequence, a FitResult, or a dict/list of them; got {type(history).__name__}"
        )
    if not named:
        raise ValueError("history is empty; pass at least one NLL curve")
    if events is not None and not isinstance(events, Mapping):
        raise ValueError("with several curves, pass events as a dict name -> events (FitResults carry their own)")
    events = events or {}
    curves = []
    for name, values in named:
        evs = events.get(name, values.events if _is_fit_result(values) else None)
        curves.append((name, _history_array(values, f"history[{name!r}]"), _event_pairs(evs, name)))
    return curves


def _references(reference) -> dict[str, float]:
    if reference is None:
        return {}
    if isinstance(reference, Real) and not isinstance(reference, bool):
        return {"reference": float(reference)}
    if isinstance(reference, Mapping):
        out = {}
        for name, value in reference.items():
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"reference[{name!r}] must be a number (an NLL); got {type(value).__name__}")
            out[str(name)] = float(value)
        return out
    raise TypeError(f"reference must be a number or a dict label -> NLL; got {type(reference).__name__}")


def plot_smallest_variances(
    steps: Sequence[int],
    smallest,
    clamp: float | None = None,
    events=(),
    ax: Axes | None = None,
    *,
    show: bool = False,
) -> Figure:
    """Each component's smallest variance over the steps (log scale): collapse made visible.

    Args:
        steps: (M,) the steps at which the variances were read.
        smallest: (M, K') the smallest diagonal variance of each covariance at those steps (K' = 1 for a
            shared covariance), e.g. `family.variances_of(raw).amin(-1)` read during the fit.
        clamp: the variance floor, drawn as a horizontal line.
        events: the fit's events (`FitResult.events`): clamps are marked by dots on the floor, resets by
            dashed vertical lines, in the component's color.
        ax: axes to draw on; default a new figure.
        show: display the figure with pyplot (blocks); default False.

    Returns:
        The figure holding `ax`.

    Raises:
        ValueError: `smallest` is not (len(steps), K') or holds a non-positive variance.
    """
    values = np.asarray(torch.as_tensor(smallest, dtype=torch.float64).cpu())
    steps = np.asarray(list(steps), dtype=np.int64)
    if values.ndim != 2 or values.shape[0] != steps.shape[0] or values.shape[0] == 0:
        raise ValueError(f"smallest must be (len(steps), K') with len(steps) = {steps.shape[0]} > 0; got {values.shape}")
    if not bool((values > 0).all()):
        raise ValueError("smallest variances must be > 0; pass variances, not log variances")
    fig, ax = target(ax, show)
    colors = component_colors(values.shape[1])
    for k in range(values.shape[1]):
        label = f"component {k}" if values.shape[1] > 1 else "shared"
        ax.plot(steps, values[:, k], color=colors[k], linewidth=1.4, label=label)
    for kind, marker in (("clamp", "clamp events"), ("reset", "resets")):
        chosen = [(int(e.step), max(int(e.component), 0)) for e in events if e.kind == kind]
        for j, (step, k) in enumerate(chosen):
            color = colors[min(k, len(colors) - 1)]
            label = marker if j == 0 else None
            if kind == "clamp" and clamp is not None:
                ax.plot([step], [clamp], marker="o", markersize=3, color=color, linestyle="none", label=label)
            elif kind == "reset":
                ax.axvline(step, color=color, linestyle="--", linewidth=0.8, alpha=0.7, label=label)
    if clamp is not None:
        ax.axhline(clamp, color="0.2", linestyle=":", linewidth=1.2, label=f"clamp {clamp:.3g}")
    ax.set_yscale("log")
    plain_power_labels(ax.yaxis)
    ax.set_xlabel("step (updates)")
    ax.set_ylabel("smallest variance of each component")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return finish(fig, show)
