"""The figures of a seed report, per family: NLL curves of every seed, final NLL per method, the median seed's fit."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

import gmm

from .config import ExperimentConfig
from .datasets import load_dataset
from .runs_table import METHODS
from .seeds import SeedOutcome


def png_bytes(fig, dpi: int = 110) -> bytes:
    from gmm.plot import FAST_PNG, laid_out

    buf = io.BytesIO()
    with laid_out(fig, dpi):
        fig.savefig(buf, dpi=dpi, **FAST_PNG)
    return buf.getvalue()


def median_outcome(outcomes: Sequence[SeedOutcome]) -> SeedOutcome:
    """The seed whose gradient-descent final train NLL is the median (the lower middle one for an even count)."""
    ranked = sorted(outcomes, key=lambda o: (o.rows[0]["train_nll"], o.seed))
    return ranked[(len(ranked) - 1) // 2]


def family_figures(
    family: str, outcomes: Sequence[SeedOutcome], runs: pd.DataFrame, config: ExperimentConfig
) -> dict[str, bytes]:
    """The three PNG figures of one family (file name -> bytes); `config` is the median seed's."""
    from gmm.plot import make_figure, plot_data_and_model, plot_nll_curve

    figures = {}
    fig, (ax,) = make_figure(figsize=(8.0, 5.2))
    curves = {f"seed {o.seed}": o.gd_history for o in outcomes}
    events = {f"seed {o.seed}": [{"step": s, "kind": "reset"} for s in o.reset_steps] for o in outcomes}
    plot_nll_curve(curves, events, ax=ax, log_x=True)
    ax.set_title(f"{family}: gradient-descent NLL of {len(outcomes)} seeds (dashed: resets)")
    figures[f"nll_curves_{family}.png"] = png_bytes(fig)

    fig, axes = make_figure(2, figsize=(10.0, 4.4))
    rows = runs[runs["family"] == family]
    for ax, column, label in zip(axes, ("train_nll", "val_nll"), ("train", "validation"), strict=True):
        paired = rows.pivot_table(index="seed", columns="method", values=column).dropna()  # seeds with both
        if paired.empty:
            ax.set_title(f"no {label} NLL")
            continue
        groups = [paired[m].to_numpy() for m in METHODS]
        ax.boxplot(groups, tick_labels=list(METHODS.values()), widths=0.5, showfliers=False, medianprops={"color": "black"})
        offsets = np.linspace(-0.15, 0.15, len(paired)) if len(paired) > 1 else np.zeros(1)
        for k, (seed, values) in enumerate(paired[list(METHODS)].iterrows()):  # one line per seed: GD to EM
            ax.plot(
                np.arange(1, len(METHODS) + 1) + offsets[k],
                values.to_numpy(),
                "o-",
                alpha=0.6,
                markersize=4,
                linewidth=0.8,
                label=f"seed {seed}" if len(paired) <= 10 else None,
            )
        if len(paired) <= 10:
            ax.legend(fontsize="x-small", ncols=2)
        ax.set_ylabel(f"final {label} NLL (nats per sample)")
        ax.set_title(f"{family}: final {label} NLL, a line per seed")
        ax.grid(True, axis="y", alpha=0.3)
    figures[f"final_nll_{family}.png"] = png_bytes(fig)

    median = median_outcome(outcomes)
    data = load_dataset(config.data_spec())
    model = gmm.make_model(config.family, config.model_components, config.model_dims, variance=median.variance)
    model.load_state_dict(median.state_dict)
    title = (
        f"{family}, median seed {median.seed} (data_seed {median.data_seed}): train NLL {median.rows[0]['train_nll']:.4f}"
    )
    figures[f"fit_{family}.png"] = png_bytes(plot_data_and_model(data.train.to(model.dtype), model, title=title))
    return figures


def all_figures(
    families: Sequence[str], outcomes: Sequence[SeedOutcome], runs: pd.DataFrame, configs: Sequence[ExperimentConfig]
) -> dict[str, bytes]:
    """The figures of every family (file name -> PNG bytes)."""
    figures: dict[str, bytes] = {}
    for family in families:
        figures.update(figures_of(family, [o for o in outcomes if o.family == family], runs, configs))
    return figures


def figures_of(
    family: str, mine: Sequence[SeedOutcome], runs: pd.DataFrame, configs: Sequence[ExperimentConfig]
) -> dict[str, bytes]:
    """`family_figures` of one family's outcomes (`runs`: at least its rows), with its median seed's config."""
    median = median_outcome(mine)
    median_config = next(c for c in configs if c.family == family and c.seed == median.seed)
    return family_figures(family, mine, runs, median_config)
