"""`make mutants` (tests/mutants.py) breaks one rule at a time in a copy: each mutation must still find the line
it breaks, so a refactor that moves the code shows up in `make test`, not as a STALE mutant months later."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutants", ROOT / "tests" / "mutants.py")
mutants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutants)


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=[m[0] for m in mutants.MUTANTS])
def test_every_mutant_finds_the_one_line_it_breaks(mutant):
    name, path, old, _new, tests = mutant
    assert (ROOT / path).read_text().count(old) == 1, f"{name}: its line is not once in {path}; update tests/mutants.py"
    assert all((ROOT / t).exists() for t in tests), f"{name}: a test file it runs is gone"
