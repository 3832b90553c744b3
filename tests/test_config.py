"""ExperimentConfig: strict loading from dicts, files and flags; derived values for the runner."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from experiments.config import ExperimentConfig, add_arguments, from_args
from experiments.datasets import DATASETS
from gmm.options import make_options


def parse(*argv: str) -> ExperimentConfig:
    return from_args(add_arguments(argparse.ArgumentParser()).parse_args(list(argv)))


def test_round_trip_through_dict_json_and_yaml(tmp_path):
    cfg = ExperimentConfig(family="tied", clamp=1e-4, em=True, num_components=3, tol=1e-7)
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    for name in ("c.json", "c.yaml"):
        assert ExperimentConfig.from_file(cfg.to_file(tmp_path / name)) == cfg
    json.dumps(cfg.to_dict())  # serializable as is


def test_yaml_float_strings_and_ints_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clamp: 1e-4\nmixture_lr: 1\nfamily: diagonal\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = ExperimentConfig.from_file(path)
    assert cfg.clamp == 1e-4 and cfg.mixture_lr == 1.0 and isinstance(cfg.mixture_lr, float)


def test_fit_options_are_accepted_by_gmm_fit():
    cfg = ExperimentConfig(iterations=3, lr_schedule="constant", init_radius=2.0)
    opts = make_options(**cfg.fit_options())
    assert opts.num_iterations == 3 and opts.init_radius == 2.0 and opts.seed == cfg.seed


def test_derived_values():
    cfg = ExperimentConfig(iterations=20_000)
    assert cfg.resolved_eval_every == 1000 and cfg.resolved_log_every == 40
    assert ExperimentConfig(iterations=300).resolved_log_every == 1
    assert cfg.model_components == cfg.components == 5
    named = ExperimentConfig(dataset="full-overlapping", val_fraction=0.3)
    spec = named.data_spec()
    assert spec == dataclasses.replace(DATASETS["full-overlapping"], val_fraction=0.3)
    assert named.model_components == spec.num_components and named.model_dims == spec.num_dims
    # a collapse dataset is fitted with its benchmark model K (spare components), as measure_collapse does
    for name in ("full-overspecified", "full-point-mass", "full-quantized"):
        assert ExperimentConfig(dataset=name).model_components == DATASETS[name].fit_components
    assert ExperimentConfig(dataset="full-point-mass").model_components == 5
    assert ExperimentConfig(dataset="full-point-mass", num_components=3).model_components == 3
    assert ExperimentConfig(data_family=None, family="isotropic").data_spec().family == "isotropic"
    flat = cfg.flat()
    assert all(isinstance(v, str) for v in flat.values())
    assert flat["clamp"] == "1e-06" and flat["samples"] == "1000" and flat["log_every"] == "40"
    assert flat["num_components"] == "5" and flat["data_family"] == "full"  # defaults given as None, resolved
    assert set(flat) == set(cfg.to_dict()) - {"data_file", "columns", "standardize"}  # each setting once
    named_flat = named.flat()  # a named dataset's data fields are that dataset's
    assert named_flat["samples"] == str(spec.num_samples) and named_flat["components"] == str(spec.num_components)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"clmap": 1e-3}, ValueError, "did you mean 'clamp'"),
        ({"family": "diagonl"}, ValueError, "diagonal"),
        ({"iterations": 1.5}, TypeError, "iterations must be an integer"),
        ({"iterations": 0}, ValueError, "iterations must be >= 1"),
        ({"clamp": "small"}, TypeError, "clamp must be a number"),
        ({"clamp": 0.0}, ValueError, "clamp must be > 0"),
        ({"em": "yes"}, TypeError, "em must be true or false"),
        ({"val_fraction": 1.0}, ValueError, "val_fraction"),
        ({"dataset": "full-separate"}, ValueError, "full-separated"),
        ({"dataset": "full-separated", "samples": 50}, ValueError, "samples cannot be set"),
        ({"num_components": 2000}, ValueError, "exceeds"),
        ({"dtype": "float16"}, ValueError, "float32"),
        ({"seed": None}, TypeError, "cannot be null"),
    ],
)
def test_bad_values_are_rejected(changes, error, match):
    with pytest.raises(error, match=match):
        ExperimentConfig.from_dict(changes)
    with pytest.raises(error, match=match):
        ExperimentConfig().replace(**changes)


@pytest.mark.parametrize(
    ("text", "suffix", "match"),
    [
        ("family: [full", ".yaml", "not valid YAML"),
        ("{'family': 'full'", ".json", "not valid JSON"),
        ("- full\n- tied\n", ".yaml", "must hold a mapping"),
        ("famly: full\n", ".yaml", "did you mean 'family'"),
    ],
)
def test_bad_files_are_rejected_naming_the_file(tmp_path, text, suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        ExperimentConfig.from_file(path)
    assert "bad" in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        ExperimentConfig.from_file(tmp_path / "missing.yaml")


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    path = ExperimentConfig(family="diagonal", clamp=1e-3, iterations=50).to_file(tmp_path / "c.yaml")
    cfg = parse("--config", str(path), "--clamp", "1e-2", "--mixture_lr", "0.05", "--no-reset", "--em")
    assert (cfg.family, cfg.iterations, cfg.clamp, cfg.mixture_lr) == ("diagonal", 50, 1e-2, 0.05)
    assert cfg.reset is False and cfg.em is True
    assert parse("--mixture-lr", "0.2", "--val_fraction", "0.5", "--tol", "none").mixture_lr == 0.2
    assert parse() == ExperimentConfig()
