"""ExperimentConfig: everything one tracked fit depends on, as a frozen dataclass with commented defaults.

A config comes from keywords, a dict, a YAML/JSON file or command-line flags; each path checks it strictly:
unknown keys are a ValueError naming them (with the closest field names), wrong types a TypeError, bad
values a ValueError saying what was received and what would work.

    cfg = ExperimentConfig(family="diagonal", iterations=5000)
    cfg = ExperimentConfig.from_file("full.yaml")                    # a flat mapping of field: value
    cfg = cfg.replace(clamp=1e-4)
    model.fit(train, **cfg.fit_options())

Config files are flat mappings (YAML or JSON), e.g.

    family: full
    dataset: full-point-mass    # a name in experiments.datasets.DATASETS; omit to use the data fields
    iterations: 5000
    clamp: 1.0e-4               # YAML 1.1 reads a bare 1e-4 as a string; float fields accept numeric strings
    em: true

Precedence on the command line: field defaults < the --config file < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import gmm
from gmm.options import GRADIENTS, SCHEDULES
from gmm.validation import check_choice, check_float, check_int, suggest

from .datasets import DataSpec, check_generated, get_spec
from .mapping_files import read_mapping_file  # re-exported: studies.space and the sweep plans read theirs

if TYPE_CHECKING:
    from .userdata import FileSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64}
INITS = tuple(gmm.INITS)
_CURVE_POINTS = 500  # the automatic log_every keeps the logged train-NLL curve near this many points


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the data, the model, the fit and what to log. Every field has a default.

    The data is a named dataset (`dataset`), a file of your own (`data_file`, split with `data_seed`), or
    `gmm.generate_data(samples, components, dims, radius, data_family, seed=data_seed)` with an optional
    perturbation; setting two of them is an error. The model has `num_components` components (default: a
    named dataset's model K, `DataSpec.fit_components`; else the data's number of clusters; for a file,
    `components`) of covariance `family`.
    """

    # -- data ---------------------------------------------------------------------------------------
    dataset: str | None = None  # a name in experiments.datasets.DATASETS; None: generate from the fields below
    data_file: str | None = None  # your own .csv/.npy/.parquet file (experiments.userdata); split by data_seed
    columns: str | None = None  # columns of data_file, by name or 0-based index ("x,y"); None: every column
    standardize: bool = False  # z-score data_file's columns by the training split's mean and std
    samples: int = 1000  # N, points in the whole dataset (train + validation)
    components: int = 5  # true clusters K of the generated data
    dims: int = 2  # D
    radius: float = 8.0  # true means are uniform in [-radius, radius]^D
    data_family: str | None = None  # covariance family of the generating mixture; None: same as `family`
    data_seed: int = 0  # seed of the generated data; the split of generated or file data uses data_seed + 1
    perturbation: str | None = None  # None or one of experiments.datasets.PERTURBATIONS (a collapse cause)
    val_fraction: float = 0.2  # held-out fraction in [0, 1): fit on the rest, report the NLL on both
    # -- model --------------------------------------------------------------------------------------
    family: str = "full"  # covariance family of the fitted model (one of gmm.FAMILIES)
    num_components: int | None = None  # components of the model; None: a named dataset's model K, else the clusters
    device: str = "cpu"  # torch device of the model and data
    dtype: str = "float32"  # "float32" or "float64"
    # -- fit (gmm.FitOptions) -------------------------------------------------------------------------
    iterations: int = 2000  # Adam steps
    mixture_lr: float = 1e-2  # Adam lr of the weight logits; 0 freezes the weights
    component_lr: float = 1e-2  # Adam lr of means and covariance parameters
    clamp: float = 1e-6  # variance floor, in variance units (not std)
    init: str = "kmeans++"  # "kmeans++", "random", "radius" or "keep"
    init_radius: float | None = None  # half-width of init="radius"; None: max |x|
    reset: bool = True  # reset collapsed components (gmm.fitting module docstring)
    reset_min_mass: float | None = None  # collapse threshold on responsibility mass; None: D + 1
    lr_schedule: str = "cosine"  # "cosine" (annealed to 0 over the fit) or "constant"
    seed: int = 42  # seed of the fit: init and resets
    tol: float | None = None  # stop when the NLL changes by less than tol in one step; None: run all steps
    gradients: str = "autograd"  # "autograd" or "analytic" (gmm.scratch)
    compile: bool = False  # torch.compile the step (compile time is reported apart from the fit)
    # -- evaluation and logging -----------------------------------------------------------------------
    eval_every: int | None = None  # steps between validation NLLs (and on_eval calls); None: iterations // 20
    log_every: int | None = None  # step of the logged train-NLL curve; None: ceil(iterations / 500)
    em: bool = False  # also fit EM from the same start and log its NLL (gmm.em)
    em_iterations: int = 1000  # EM iterations at most (fit_em num_iterations)
    em_tol: float = 1e-8  # EM tolerance, nats per iteration
    log_figures: bool = True  # log the fit and NLL-curve figures (matplotlib; slower than the logging)
    log_model: bool = True  # log the fitted state_dict + config, for experiments.load_model(run_id)

    def __post_init__(self):
        self._check_values()
        self._check_data_source()

    def _check_values(self) -> None:
        """Each field on its own: its type and range (ValueError / TypeError naming it)."""
        if self.dataset is not None:
            get_spec(self.dataset)  # ValueError with close names
        check_int(self.samples, "samples", minimum=1)
        check_int(self.components, "components", minimum=1)
        check_int(self.dims, "dims", minimum=1)
        if self.data_family is not None:
            check_choice(self.data_family, gmm.FAMILIES, "data_family")
        check_int(self.data_seed, "data_seed", minimum=0)
        check_generated(self.radius, self.perturbation, self.val_fraction)
        check_choice(self.family, gmm.FAMILIES, "family")
        if self.num_components is not None:
            check_int(self.num_components, "num_components", minimum=1)
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(f"device must be a device name such as 'cpu' or 'cuda'; got {self.device!r}")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device {self.device!r} is not a torch device name ({err}); use e.g. 'cpu'") from None
        _check_device_available(torch.device(self.device))
        check_choice(self.dtype, DTYPES, "dtype")
        check_int(self.iterations, "iterations", minimum=1)
        check_float(self.mixture_lr, "mixture_lr", nonnegative=True)
        check_float(self.component_lr, "component_lr", nonnegative=True)
        check_float(self.clamp, "clamp", positive=True)
        check_choice(self.init, INITS, "init")
        if self.init_radius is not None:
            check_float(self.init_radius, "init_radius", positive=True)
        _check_bool(self.reset, "reset")
        if self.reset_min_mass is not None:
            check_float(self.reset_min_mass, "reset_min_mass", nonnegative=True)
        check_choice(self.lr_schedule, SCHEDULES, "lr_schedule")
        check_int(self.seed, "seed", minimum=0)
        if self.tol is not None:
            check_float(self.tol, "tol", positive=True)
        check_choice(self.gradients, GRADIENTS, "gradients")
        if self.eval_every is not None:
            check_int(self.eval_every, "eval_every", minimum=1)
        if self.log_every is not None:
            check_int(self.log_every, "log_every", minimum=1)
        check_int(self.em_iterations, "em_iterations", minimum=1)
        check_float(self.em_tol, "em_tol", nonnegative=True)
        for name in ("compile", "em", "log_figures", "log_model", "standardize"):
            _check_bool(getattr(self, name), name)

    def _check_data_source(self) -> None:
        """The data fields together: a named dataset, a data file or generated data, and a model K they allow."""
        if self.dataset is not None:
            clash = [name for name in _DATA_FIELDS if getattr(self, name) != _DATA_DEFAULTS[name]]
            if self.data_file is not None:
                clash.insert(0, "data_file")
            if clash:
                raise ValueError(
                    f"dataset={self.dataset!r} fixes the data, so {', '.join(clash)} cannot be set with it; "
                    "drop them, or drop dataset to generate data from them"
                )
        if self.data_file is not None:
            if not isinstance(self.data_file, str) or not self.data_file:
                raise TypeError(f"data_file must be a file path; got {self.data_file!r}")
            clash = [n for n in _GENERATION_FIELDS if getattr(self, n) != _DATA_DEFAULTS[n]]
            if clash:
                raise ValueError(
                    f"{', '.join(clash)} describe generated data, not data_file={self.data_file!r}; drop them "
                    "(components and data_seed apply: the model's K and the split's seed)"
                )
        elif self.columns is not None or self.standardize:
            raise ValueError("columns and standardize apply to a data file only; pass data_file (--data FILE) too")
        spec = self.data_spec()
        k = self.model_components
        if self.data_file is not None:
            from .userdata import load_file

            load_file(spec, k)  # a bad file, NaN rows or too few rows fail here, with the row or column
        elif k > spec.num_samples:
            raise ValueError(f"num_components={k} exceeds the {spec.num_samples} samples; use fewer components")

    # -- derived values ---------------------------------------------------------------------------------
    def data_spec(self) -> DataSpec | FileSpec:
        """The spec of the data: the named dataset's (with this val_fraction), the data file's, or the fields'."""
        if self.data_file is not None:
            from .userdata import FileSpec

            return FileSpec(self.data_file, self.columns, self.data_seed, self.val_fraction, self.standardize)
        if self.dataset is not None:
            return dataclasses.replace(get_spec(self.dataset), val_fraction=self.val_fraction)
        return DataSpec(
            num_samples=self.samples,
            num_components=self.components,
            num_dims=self.dims,
            radius=self.radius,
            family=self.data_family if self.data_family is not None else self.family,
            seed=self.data_seed,
            perturbation=self.perturbation,
            val_fraction=self.val_fraction,
        )

    @property
    def model_components(self) -> int:
        """Components of the fitted model: num_components, else a named dataset's model K (its `fit_components`:
        the spare components of a collapse dataset), else the data's number of clusters."""
        if self.num_components is not None:
            return self.num_components
        return get_spec(self.dataset).fit_components if self.dataset is not None else self.components

    @property
    def model_dims(self) -> int:
        if self.data_file is not None:
            return self.data_spec().shape[1]
        return get_spec(self.dataset).num_dims if self.dataset is not None else self.dims

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def resolved_eval_every(self) -> int:
        return self.eval_every if self.eval_every is not None else max(1, self.iterations // 20)

    @property
    def resolved_log_every(self) -> int:
        return self.log_every if self.log_every is not None else max(1, math.ceil(self.iterations / _CURVE_POINTS))

    def fit_options(self) -> dict[str, Any]:
        """Keyword options of `model.fit` / `gmm.fit` (callback and log_freq are the runner's to add)."""
        return {option: getattr(self, name) for option, name in _FIT_OPTIONS.items()}

    def em_options(self) -> dict[str, Any]:
        """Keyword options of `gmm.em.fit_em`: the same start (init, seed, clamp) as the gradient fit."""
        return {option: getattr(self, name) for option, name in _EM_OPTIONS.items()}

    # -- conversions ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, by name (JSON-serializable; from_dict(to_dict()) gives back an equal config)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def flat(self) -> dict[str, str]:
        """MLflow params: each setting once, with the value in effect (the exact config is `to_dict()`).

        A named dataset's data fields hold that dataset's values; a data file's hold its shape (samples,
        dims), and the generation-only fields are left out; defaults given as None are resolved
        (num_components, data_family, eval_every, log_every).
        """
        params = self.to_dict()
        if self.dataset is not None:
            spec = get_spec(self.dataset)
            params.update(
                samples=spec.num_samples,
                components=spec.num_components,
                dims=spec.num_dims,
                radius=spec.radius,
                data_family=spec.family,
                data_seed=spec.seed,
                perturbation=spec.perturbation,
            )
        elif self.data_file is not None:
            for name in ("components", *_GENERATION_FIELDS):
                params.pop(name)
            params["samples"], params["dims"] = self.data_spec().shape
        elif self.data_family is None:
            params["data_family"] = self.family
        if self.data_file is None:
            for name in ("data_file", "columns", "standardize"):
                params.pop(name)
        params["num_components"] = self.model_components
        params["eval_every"] = self.resolved_eval_every
        params["log_every"] = self.resolved_log_every
        return {k: _param(v) for k, v in params.items()}

    def replace(self, **changes) -> ExperimentConfig:
        """A copy with `changes` (checked like from_dict: unknown keys and bad values raise)."""
        return ExperimentConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """A config from a flat mapping of field names to values.

        Raises:
            ValueError: unknown keys (the closest field names are suggested) or bad values.
            TypeError: `d` is not a mapping, or a value of the wrong type.
        """
        if not isinstance(d, dict):
            raise TypeError(f"an experiment config must be a mapping of field: value; got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = [f"{key!r}{suggest(key, names)}" for key in unknown]
            raise ValueError(f"unknown config key(s) {', '.join(hints)}; the fields are: {', '.join(names)}")
        return cls(**{k: _coerce(k, v) for k, v in d.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> ExperimentConfig:
        """A config from a YAML (.yaml/.yml) or JSON (.json) file holding a flat mapping.

        Raises:
            ValueError: a missing or unreadable file, invalid YAML/JSON, a file that is not a mapping,
                unknown keys or bad values (the message names the file).
            TypeError: a value of the wrong type.
        """
        path = Path(path)
        data = read_mapping_file(path, "config file", "hold a mapping of field: value")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{path}: {err}") from None

    def to_file(self, path: str | Path) -> Path:
        """Write the config as JSON (.json) or YAML (any other suffix); from_file reads it back."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


# option of gmm's fit -> the field (or property) that holds it
_FIT_OPTIONS = {
    "num_iterations": "iterations",
    "mixture_lr": "mixture_lr",
    "component_lr": "component_lr",
    "clamp": "clamp",
    "init": "init",
    "init_radius": "init_radius",
    "reset": "reset",
    "reset_min_mass": "reset_min_mass",
    "lr_schedule": "lr_schedule",
    "seed": "seed",
    "tol": "tol",
    "gradients": "gradients",
    "compile": "compile",
    "device": "device",
    "dtype": "torch_dtype",
}
# option of gmm.em.fit_em -> the field that holds it
_EM_OPTIONS = {
    "num_iterations": "em_iterations",
    "tol": "em_tol",
    "clamp": "clamp",
    "init": "init",
    "seed": "seed",
    "init_radius": "init_radius",
}
_DATA_FIELDS = ("samples", "components", "dims", "radius", "data_family", "data_seed", "perturbation")
_GENERATION_FIELDS = ("samples", "dims", "radius", "data_family", "perturbation")  # meaningless for a data file
_DATA_DEFAULTS = {f.name: f.default for f in fields(ExperimentConfig) if f.name in _DATA_FIELDS}

# -- field types ------------------------------------------------------------------------------------------
_FLOATS = {f.name for f in fields(ExperimentConfig) if "float" in str(f.type)}
_NULLABLE = {f.name for f in fields(ExperimentConfig) if "None" in str(f.type)}


def _coerce(name: str, value: Any) -> Any:
    """Accept ints for float fields and numeric strings for float fields (YAML 1.1 reads 1e-6 as a string)."""
    if value is None and name not in _NULLABLE:
        raise TypeError(f"{name} cannot be null; remove the key to use the default")
    if name in _FLOATS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise TypeError(f"{name} must be a number; got {value!r}") from None
    if name in _FLOATS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false; got {value!r} ({type(value).__name__})")
    return value


def _param(value: Any) -> str:
    return "None" if value is None else str(value)


# -- command line -------------------------------------------------------------------------------------------
def _flag_names(name: str, demo: bool) -> list[str]:
    if name == "data_file":
        return ["--data", "--data-file", "--data_file"]
    dashed = f"--{name.replace('_', '-')}"
    underscored = f"--{name}"
    if dashed == underscored:
        return [dashed]
    return [underscored, dashed] if demo else [dashed, underscored]


# field -> (help, demo-style flag); the demo's own flags keep their underscores (--mixture_lr) and also
# accept dashes, the runner's new flags are dashed (--val-fraction) and also accept underscores
_FLAGS: dict[str, tuple[str, bool]] = {
    "dataset": (
        "a named dataset (python -m experiments.datasets lists them); overrides the data flags",
        False,
    ),
    "data_file": ("your own data: a .csv (header optional), .npy or .parquet file of numeric columns", False),
    "columns": ("columns of --data to use, by name or 0-based index (x,y or 0,2)", False),
    "standardize": ("z-score --data's columns by the training split's mean and std", False),
    "samples": ("data points N (train + validation)", True),
    "components": ("true clusters K of the generated data (and of the model unless --num-components)", True),
    "dims": ("dimensions D", True),
    "radius": ("true means are uniform in [-radius, radius]^D", True),
    "data_family": ("covariance family of the generated data (default: the model's family)", False),
    "data_seed": ("seed of the generated data, and of the train/validation split", False),
    "perturbation": ("perturb the generated data: point_mass, quantized, subspace or outliers", False),
    "val_fraction": ("held-out fraction of the data, in [0, 1)", False),
    "family": ("covariance family of the model", True),
    "num_components": ("components of the model (default: a named dataset's model K, else the data's clusters)", False),
    "device": ("torch device", False),
    "dtype": ("float32 or float64", False),
    "iterations": ("Adam steps", True),
    "mixture_lr": ("Adam learning rate of the weight logits", True),
    "component_lr": ("Adam learning rate of means and covariances", True),
    "clamp": ("variance floor, in variance units", True),
    "init": ("initialization: kmeans++, random, radius or keep", True),
    "init_radius": ("half-width of --init radius", False),
    "reset": ("reset collapsed components (--no-reset turns it off)", False),
    "reset_min_mass": ("collapse threshold on responsibility mass (default D + 1)", False),
    "lr_schedule": ("cosine or constant", False),
    "seed": ("seed of the fit (init and resets)", True),
    "tol": ("stop when the NLL changes by less than this in one step", False),
    "gradients": ("autograd or analytic", False),
    "compile": ("torch.compile the step", False),
    "eval_every": ("steps between validation NLLs (default iterations // 20)", False),
    "log_every": ("step of the logged train-NLL curve (default ceil(iterations / 500))", False),
    "em": ("also fit EM from the same start and log its NLL", False),
    "em_iterations": ("EM iterations at most", False),
    "em_tol": ("EM tolerance, nats per iteration", False),
    "log_figures": ("log the fit and NLL-curve figures (--no-log-figures turns it off)", False),
    "log_model": ("log the fitted model (--no-log-model turns it off)", False),
}
_unlisted = [f.name for f in fields(ExperimentConfig) if f.name not in _FLAGS]
if _unlisted:  # a new field without its flag: say so at import, not as a KeyError inside --help
    raise TypeError(f"ExperimentConfig field(s) {', '.join(_unlisted)} lack a row in experiments.config._FLAGS (--help)")


def _none_or(kind):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --config FILE and one flag per ExperimentConfig field to `parser`.

    Flags default to "not given" (argparse.SUPPRESS), so `from_args` applies only what was typed, on top
    of the --config file, on top of the field defaults. Booleans are --em / --no-em style switches.
    """
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="YAML or JSON config file")
    defaults = ExperimentConfig()
    for f in fields(ExperimentConfig):
        help_text, demo = _FLAGS[f.name]
        default = getattr(defaults, f.name)
        flags = _flag_names(f.name, demo)
        common = {"dest": f.name, "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            parser.add_argument(
                *flags,
                action=argparse.BooleanOptionalAction,
                help=f"{help_text} [default: {default}]",
                **common,
            )
            continue
        kind = int if "int" in str(f.type) else float if f.name in _FLOATS else str
        if f.name in _NULLABLE:
            kind = _none_or(kind)
        parser.add_argument(*flags, type=kind, metavar=f.name.upper(), help=f"{help_text} [default: {default}]", **common)
    return parser


def from_args(ns: argparse.Namespace) -> ExperimentConfig:
    """The config of parsed flags: defaults, then the --config file, then every flag given."""
    given = {f.name: getattr(ns, f.name) for f in fields(ExperimentConfig) if hasattr(ns, f.name)}
    config_file = getattr(ns, "config", None)
    base = ExperimentConfig.from_file(config_file) if config_file else ExperimentConfig()
    return base.replace(**given) if given else base


def _check_device_available(device: torch.device) -> None:
    """ValueError unless this torch build can put tensors on `device` (e.g. 'cuda' on a CPU-only build)."""
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type == "meta" or available is None or not available():
        raise ValueError(
            f"device {str(device)!r} is not available in this torch build ({torch.__version__}); use device 'cpu'"
            + (" or install a CUDA build of torch" if device.type == "cuda" else "")
        )
