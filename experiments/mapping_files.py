"""Reading the project's flat YAML/JSON files (experiment configs, study search spaces, sweep plans)."""

from __future__ import annotations

import json
from pathlib import Path


def read_mapping_file(path: str | Path, what: str, shape: str) -> dict:
    """The mapping held by a YAML (or, by its .json suffix, JSON) file; an empty file gives {}.

    Raises ValueError naming `what` and the file when it cannot be read, does not parse, or holds something
    other than a mapping (`shape` says what it must hold, e.g. "hold a mapping of field: value").
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"cannot read {what} {str(path)!r}: {err.strerror or err}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {err}") from None
    except Exception as err:  # yaml.YAMLError and its subclasses
        first = " ".join(str(err).split())
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must {shape}; got a {type(data).__name__}")
    return data
