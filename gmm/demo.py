"""The seed project's demo: draw mock data from a known mixture, fit it by gradient descent, print the
progress and the final loss, and plot the fit.

    python -m gmm.demo                                   # the original defaults (full family, 20,000 steps)
    python -m gmm.demo --family diagonal --em --out fit.png
    python -m gmm.demo --iterations 2000 --visualize false

The flags and defaults of the original are kept (`--samples 1000 --components 5 --dims 2 --iterations 20000
--family full --log_freq 5000 --radius 8.0 --mixture_lr 3e-5 --component_lr 1e-2 --visualize --seed 42`);
`--family` takes every family in `gmm.FAMILIES`. New: `--clamp`, `--init`, `--n_init` (restarts), `--em` (also
fit EM from the same start and print both NLLs), `--out FILE` (where the figure goes; without a display it
defaults to demo.png), `--gradients`, `--compile`. Bad flags or values print one line to stderr and exit with
status 2. The learning rates are in units of the data's spread (`gmm.standardize`), the clamp in the data's.

A fit that ends more than 0.05 nats per sample above the true parameters' NLL prints a warning to stderr: with
enough data a maximum-likelihood fit ends at or below the truth, so such a gap means a poor local optimum.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

import gmm
from gmm.cli import OneLineParser
from gmm.options import GRADIENTS, FitOptions
from gmm.validation import check_choice

DEFAULT_FIGURE = "demo.png"
ABOVE_TRUTH_WARNING = 0.05  # nats per sample above the true parameters' NLL that the demo warns about
_TRUE = ("true", "t", "yes", "y", "1", "on")
_FALSE = ("false", "f", "no", "n", "0", "off")


def parse_bool(text: str) -> bool:
    """'true'/'false', 'yes'/'no', '1'/'0', 'on'/'off' (any case) -> bool; anything else is an error.

    (`type=bool` would turn the string "False" into True.)
    """
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0); got {text!r}")


def _choice(choices: Sequence[str], name: str):
    """An argparse type accepting one of `choices`, suggesting the closest name on a typo."""

    def parse(text: str) -> str:
        try:
            return check_choice(text, choices, name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name
    return parse


PROG = "python -m gmm.demo"


def build_parser() -> argparse.ArgumentParser:
    defaults = FitOptions()
    p = OneLineParser(
        prog=PROG,
        description="Fit a Gaussian mixture by gradient descent to mock data drawn from a known mixture.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--samples", type=int, default=1000, help="number of data points N")
    p.add_argument("--components", type=int, default=5, help="mixture components K (of the data and the model)")
    p.add_argument("--dims", type=int, default=2, help="dimensions D")
    p.add_argument("--iterations", type=int, default=20_000, help="Adam steps")
    p.add_argument(
        "--family",
        type=_choice(gmm.FAMILIES, "family"),
        default="full",
        help=f"one of {', '.join(gmm.FAMILIES)}",
    )
    p.add_argument("--log_freq", type=int, default=5_000, help="steps between progress lines")
    p.add_argument("--radius", type=float, default=8.0, help="true means are uniform in [-radius, radius]^D")
    p.add_argument("--mixture_lr", type=float, default=3e-5, help="Adam learning rate of the weight logits")
    p.add_argument("--component_lr", type=float, default=1e-2, help="Adam learning rate of means and covariances")
    p.add_argument(
        "--visualize",
        type=parse_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="plot the fit (a bare --visualize means true; --visualize false turns it off)",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the data and of the fit (init and resets)")
    p.add_argument("--clamp", type=float, default=defaults.clamp, help="variance floor, in variance units")
    p.add_argument(
        "--init",
        type=_choice(gmm.INITS, "init"),
        default=defaults.init,
        help=f"starting point: one of {', '.join(gmm.INITS)} ('radius' is the original's uniform draw)",
    )
    p.add_argument("--n_init", type=int, default=defaults.n_init, help="starts (seeds seed, seed + 1, ...), best kept")
    p.add_argument("--em", action="store_true", help="also fit EM from the same start and print both NLLs")
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help=f"save the figure to FILE (.png, .pdf, .svg, ...); default without a display: {DEFAULT_FIGURE}",
    )
    p.add_argument(
        "--gradients",
        type=_choice(GRADIENTS, "gradients"),
        default=defaults.gradients,
        help="'autograd' or 'analytic' (hand-derived, gmm.scratch)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the fit step (falls back to eager)")
    return p


def has_display() -> bool:
    """Whether an interactive matplotlib window can be opened here."""
    if os.environ.get("MPLBACKEND", "").lower() in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        return False
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _progress(width: int):
    def callback(step: int, nll: float, new_events: list) -> None:
        resets = sum(e.kind == "reset" for e in new_events)
        note = f", resets: {resets}" if resets else ""
        print(f"Iteration: {step:>{width}d}, Loss: {nll:.4f}{note}", flush=True)

    return callback


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo with command-line arguments `argv` (default sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is not None and not args.visualize:
        parser.error("--out needs the figure: drop --out, or drop --visualize false")
    out = args.out if args.out is not None else (None if has_display() else DEFAULT_FIGURE)
    if args.visualize and out is not None:
        from gmm.plot import check_figure_path

        try:  # a bad suffix fails now, not after the fit
            check_figure_path(out)
        except ValueError as err:
            parser.error(f"--out: {err}")

    try:
        return _run(args, out)
    except ValueError as err:  # a bad value, reported by the library with its fix
        parser.error(str(err))
    except ImportError as err:  # --gradients analytic / --compile without gmm.scratch
        parser.error(f"--gradients {args.gradients}{' --compile' if args.compile else ''} is unavailable: {err}")
    except FloatingPointError as err:  # the NLL became non-finite: a failed fit, not a usage error
        print(f"{parser.prog}: fit failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


# the flags passed on to gmm.fit under the same name (and --radius, the original's one radius for data and init)
_FIT_FLAGS = ("mixture_lr", "component_lr", "clamp", "init", "seed", "log_freq", "gradients", "compile", "n_init")


def _run(args: argparse.Namespace, out: str | None) -> int:
    """Data -> gradient-descent fit (-> EM) -> printed summary (-> figure)."""
    mock = gmm.generate_data(
        args.samples, args.components, args.dims, radius=args.radius, family=args.family, seed=args.seed
    )
    print(
        f"Data: {args.samples} samples from a {args.components}-component {args.family} mixture in "
        f"{args.dims} dims (radius {args.radius:g}, seed {args.seed})",
        flush=True,
    )
    model = gmm.make_model(args.family, args.components, args.dims)
    result = gmm.fit(
        model,
        mock.data,
        num_iterations=args.iterations,
        progress=False,  # the progress lines below take its place
        callback=_progress(len(str(args.iterations))),
        init_radius=args.radius,
        **{name: getattr(args, name) for name in _FIT_FLAGS},
    )
    true_nll = mock.true_model().nll(mock.data)
    print(f"Final Loss: {result.final_nll:.2f}")
    print(
        f"GD NLL: {result.final_nll:.6f} ({result.num_iterations} iterations, {result.wall_time:.2f} s, "
        f"{result.iterations_per_second:.0f} it/s, {result.reset_count} resets)"
    )
    print(f"True NLL: {true_nll:.6f} (the generating parameters)")
    if result.final_nll - true_nll > ABOVE_TRUTH_WARNING:
        print(
            f"{PROG}: warning: the fit ends {result.final_nll - true_nll:.4f} nats above the true parameters' NLL "
            f"(> {ABOVE_TRUTH_WARNING}): a poor local optimum; try --n_init 10 or another --seed",
            file=sys.stderr,
        )

    em_result = None
    if args.em:
        from gmm.em import fit_em

        em_model = gmm.make_model(args.family, args.components, args.dims)
        with warnings.catch_warnings():  # "not converged" is printed on the EM line instead
            warnings.simplefilter("ignore", UserWarning)
            em_result = fit_em(
                em_model, mock.data, init=args.init, clamp=args.clamp, init_radius=args.radius, seed=args.seed
            )
        state = "converged" if em_result.converged else "not converged"
        print(
            f"EM NLL: {em_result.final_nll:.6f} ({em_result.num_iterations} iterations, "
            f"{em_result.wall_time:.3f} s, {state})"
        )
        print(f"GD - EM: {result.final_nll - em_result.final_nll:+.6f} nats/sample")

    if args.visualize:
        _visualize(mock, model, result, em_result, true_nll, out)
    return 0


def _visualize(mock, model, result, em_result, true_nll: float, out: str | None) -> None:
    """Three panels: the data with the true mixture, with the fitted one, and the NLL curves."""
    from gmm.plot import make_figure, plot_data_and_model, plot_nll_curve, save_figure

    show = out is None
    fig, (ax_true, ax_fit, ax_nll) = make_figure(3, figsize=(19.0, 5.8), show=show)
    k, d = model.num_components, model.num_dims
    plot_data_and_model(
        mock.data,
        mock.true_model(),
        ax=ax_true,
        labels=mock.labels,
        title=f"true {mock.family} mixture, K={k}, D={d}: NLL {true_nll:.4f} nats/sample",
    )
    plot_data_and_model(mock.data, model, ax=ax_fit)
    curves = {"gradient descent": result} if em_result is None else {"gradient descent": result, "EM": em_result}
    plot_nll_curve(curves, ax=ax_nll, log_x=True, reference={"true parameters": true_nll})
    ax_nll.set_title(f"NLL per step ({mock.family}, seed {result.options.seed})", fontsize=10)
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    else:
        print(f"Figure saved to {save_figure(fig, out)}")


if __name__ == "__main__":
    sys.exit(main())
