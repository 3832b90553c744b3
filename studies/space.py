"""The search space of each family's study: which ExperimentConfig fields Optuna tunes, and over what range.

The default space is the checked-in `studies/space.yaml` (its header documents the format); a file of the same
form given with `--space FILE` overrides it parameter by parameter:

    space = load_space("full")                         # the default space of the "full" family
    space = load_space("full", "my_space.yaml")        # with overrides
    overrides = space.suggest(trial)                   # {"clamp": 3e-5, "component_lr": 0.04, ...}
    space.to_config(study.best_trial.params)           # the same dict, rebuilt from stored trial params
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.config import ExperimentConfig
from experiments.mapping_files import read_mapping_file
from gmm import FAMILIES
from gmm.validation import suggest

DEFAULT_SPACE_FILE = Path(__file__).with_name("space.yaml")
FROZEN_SUFFIX = "_frozen"  # the categorical that carries a float parameter's 'frozen' (= 0) choice


@dataclass(frozen=True)
class FloatParam:
    """A float in [low, high], sampled uniformly (or in log space), optionally with a 'frozen' = 0 choice."""

    name: str
    low: float
    high: float
    log: bool = False
    frozen: bool = False  # add a categorical `<name>_frozen`; True sets the value to 0 (e.g. a frozen learning rate)

    def suggest(self, trial) -> float:
        if self.frozen and trial.suggest_categorical(self.name + FROZEN_SUFFIX, [False, True]):
            return 0.0
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def value(self, params: Mapping[str, Any]) -> float:
        if self.frozen and params.get(self.name + FROZEN_SUFFIX, False):
            return 0.0
        return float(params[self.name])

    def describe(self) -> str:
        text = f"{self.name}: {self.low:g}..{self.high:g}{' (log)' if self.log else ''}"
        return text + (" or frozen (0)" if self.frozen else "")

    def as_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "log": self.log, "frozen": self.frozen}


@dataclass(frozen=True)
class ChoiceParam:
    """A categorical choice among `choices` (str, int, float or bool values)."""

    name: str
    choices: tuple

    def suggest(self, trial):
        return trial.suggest_categorical(self.name, list(self.choices))

    def value(self, params: Mapping[str, Any]):
        return params[self.name]

    def describe(self) -> str:
        return f"{self.name}: one of {', '.join(map(str, self.choices))}"

    def as_dict(self) -> dict:
        return {"choices": list(self.choices)}


Param = FloatParam | ChoiceParam


@dataclass(frozen=True)
class SearchSpace:
    """The tuned parameters of one family's study and the values it fixes.

    Attributes:
        family: the covariance family (a name in gmm.FAMILIES).
        params: the searched parameters, in the order they are suggested.
        fixed: ExperimentConfig fields the space file pins for every trial (not searched).
    """

    family: str
    params: tuple[Param, ...]
    fixed: dict = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def suggest(self, trial) -> dict:
        """Ask `trial` (an optuna.Trial) for every parameter; returns ExperimentConfig overrides (+ fixed)."""
        return {**self.fixed, **{p.name: p.suggest(trial) for p in self.params}}

    def to_config(self, params: Mapping[str, Any]) -> dict:
        """ExperimentConfig overrides from a trial's stored `params` (e.g. `study.best_params`), + fixed."""
        return {**self.fixed, **{p.name: p.value(params) for p in self.params}}

    def as_dict(self) -> dict:
        """JSON-able (the study records it, so a resumed study can check that it searches the same space)."""
        return {"params": {p.name: p.as_dict() for p in self.params}, "fixed": dict(self.fixed)}

    def describe(self) -> str:
        parts = [p.describe() for p in self.params] + [f"{k} = {v!r} (fixed)" for k, v in self.fixed.items()]
        return "; ".join(parts) if parts else "(nothing to search)"


def read_space_file(path: str | Path) -> dict:
    """The raw {section: {name: entry}} mapping of a YAML or JSON space file, checked for shape."""
    raw = read_mapping_file(path, "search-space file", "map sections ('default' or a family) to parameters")
    sections = ("default", *FAMILIES)
    for section, entries in raw.items():
        if section not in sections:
            raise ValueError(
                f"unknown section {section!r} in {str(path)!r}; use 'default' or a family "
                f"({', '.join(FAMILIES)}){suggest(section, sections)}"
            )
        if entries is not None and not isinstance(entries, dict):
            raise ValueError(f"section {section!r} of {str(path)!r} must map parameter names to entries")
    return raw


def _check_number(value, what: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-1 (no dot) as a string; config files accept it as a number
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number; got {value!r}")
    return float(value)


def make_param(name: str, entry: Mapping[str, Any]) -> Param:
    """One parameter from its space-file entry ({low, high, log, frozen} or {choices})."""
    keys = set(entry)
    if "choices" in keys:
        if keys != {"choices"}:
            raise ValueError(f"parameter {name!r}: a choice entry takes only 'choices'; got keys {sorted(keys)}")
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"parameter {name!r}: 'choices' must be a non-empty list; got {choices!r}")
        return ChoiceParam(name, tuple(choices))
    allowed = {"low", "high", "log", "frozen"}
    if not {"low", "high"} <= keys or not keys <= allowed:
        raise ValueError(
            f"parameter {name!r}: a range entry needs 'low' and 'high' (optional 'log', 'frozen'); got keys {sorted(keys)}"
        )
    low = _check_number(entry["low"], f"parameter {name!r} low")
    high = _check_number(entry["high"], f"parameter {name!r} high")
    log, frozen = entry.get("log", False), entry.get("frozen", False)
    if not isinstance(log, bool) or not isinstance(frozen, bool):
        raise ValueError(f"parameter {name!r}: 'log' and 'frozen' must be true or false; got {log!r}, {frozen!r}")
    if not low < high:
        raise ValueError(f"parameter {name!r}: low must be below high; got low={low:g}, high={high:g}")
    if log and low <= 0:
        raise ValueError(f"parameter {name!r}: a log range needs low > 0; got low={low:g}")
    return FloatParam(name, low, high, log, frozen)


def load_space(family: str, path: str | Path | None = None, *, base: str | Path | None = DEFAULT_SPACE_FILE) -> SearchSpace:
    """The search space of `family`: the default file, its family section, then `path` on top.

    Args:
        family: a name in gmm.FAMILIES.
        path: an override file (same format as studies/space.yaml), or None.
        base: the default space file; None starts from an empty space.

    Raises:
        ValueError: unknown family, section or parameter name, or a malformed entry (the message says which).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}{suggest(family, FAMILIES)}")
    entries: dict[str, Any] = {}
    for source in [p for p in (base, path) if p is not None]:
        raw = read_space_file(source)
        for section in ("default", family):
            entries.update(raw.get(section) or {})
    fields = [f.name for f in dataclasses.fields(ExperimentConfig)]
    params: list[Param] = []
    fixed: dict[str, Any] = {}
    for name, entry in entries.items():
        if name not in fields:
            raise ValueError(
                f"unknown parameter {name!r} in the search space; use ExperimentConfig fields{suggest(name, fields)}"
            )
        if entry is None:
            continue
        if isinstance(entry, Mapping):
            params.append(make_param(name, entry))
        else:
            fixed[name] = entry
    return SearchSpace(family, tuple(params), fixed)


def check_values(space: SearchSpace, make_config: Callable[[dict], object], where: str = "the search space") -> None:
    """Build a config (`make_config(overrides)`, e.g. a trial's) with every value the space can suggest: each
    choice, each bound, the frozen 0, and the fixed values; so a bad entry fails before the first trial.

    Raises:
        ValueError: naming the parameter, the value and what the config said about it.
    """
    probes: list[tuple[str, object]] = [("(fixed values)", None)]
    for p in space.params:
        values = p.choices if isinstance(p, ChoiceParam) else (p.low, p.high, *((0.0,) if p.frozen else ()))
        probes += [(p.name, v) for v in values]
    for name, value in probes:
        overrides = dict(space.fixed) if value is None else {**space.fixed, name: value}
        try:
            make_config(overrides)
        except (ValueError, TypeError) as err:
            shown = name if value is None else f"{name} = {value!r}"
            raise ValueError(f"{where} ({space.family}): {shown} is not accepted: {err}; fix the space file") from None
