"""Your own data: a .csv, .npy or .parquet file read into a Dataset like the named ones (fingerprint, seeded split).

    python -m experiments.run --data points.csv --components 4          # or: make run DATA=points.csv
    python -m experiments.run --data table.parquet --columns x,y --standardize
    spec = FileSpec("points.csv", seed=0); ds = load_file(spec); ds.train, ds.val, ds.fingerprint

- `.csv`: numeric columns, with or without a header line (a first row that does not parse as numbers is a
  header); `columns` picks some by header name or by 0-based index ("x,y" or "0,2").
- `.npy`: a 2-D numeric array (a 1-D one is one column).
- `.parquet`: read with pandas (pyarrow); numeric columns.

The split is the named datasets' rule: a permutation from a torch.Generator seeded with `seed + 1`; the
validation rows are the first round(val_fraction * N) of it. The fingerprint is `gmm.fingerprint` of the
selected columns as float32 (before standardization), so the same file and columns give the same print
wherever they are; `file_sha256` hashes the file's bytes. `standardize` centres and scales every column by
the training split's mean and standard deviation (the validation rows are transformed with the same ones).
There is no truth behind a file: truth-based measures (true-parameter NLL, recovery error, ARI) are NaN.

Every problem is one ValueError naming the file, the row or column, and the fix.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import gmm
from gmm.validation import check_float, check_int

from .datasets import Dataset

SUFFIXES = (".csv", ".npy", ".parquet")


@dataclass(frozen=True)
class FileSpec:
    """A data file and how to read and split it.

    Attributes:
        path: the file (.csv, .npy or .parquet).
        columns: comma-separated column names or 0-based indices; None: every column.
        seed: the split uses a generator seeded with seed + 1 (as the named datasets do).
        val_fraction: held-out fraction in [0, 1).
        standardize: z-score every column with the training split's mean and std.
    """

    path: str
    columns: str | None = None
    seed: int = 0
    val_fraction: float = 0.2
    standardize: bool = False

    def __post_init__(self):
        check_int(self.seed, "data_seed", minimum=0)
        vf = check_float(self.val_fraction, "val_fraction", nonnegative=True)
        if vf >= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {vf}. Use e.g. 0.2 to hold out 20% of the data")

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @property
    def shape(self) -> tuple[int, int]:
        """(N, D) of the selected columns (the file is read once per process and path state)."""
        return tuple(read_matrix(self.path, self.columns).shape)


def _stamp(path: str) -> tuple:
    try:
        st = Path(path).stat()
    except OSError as err:
        raise ValueError(f"cannot read data file {path!r}: {err.strerror or err}; check the path") from None
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def read_matrix(path: str, columns: str | None = None) -> np.ndarray:
    """The (N, D) float32 matrix of a data file's selected columns (see the module docstring)."""
    return _read_cached(_stamp(path), path, columns)


@functools.lru_cache(maxsize=8)
def _read_cached(stamp: tuple, path: str, columns: str | None) -> np.ndarray:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"data file {path!r} has suffix {suffix or '(none)'!r}; use a .csv, .npy or .parquet file")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"data file {path!r} is not a readable .npy array ({err}); save it with numpy.save") from None
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2:
            raise ValueError(f"data file {path!r} holds an array of shape {array.shape}; save a 2-D (samples, dims) array")
        names = [str(i) for i in range(array.shape[1])]
        frame = None
    else:
        frame = _read_table(path, suffix)
        names = [str(c) for c in frame.columns]
    index = _select(path, names, columns)
    if frame is not None:
        matrix = _numeric(path, frame.iloc[:, index])
    else:
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise ValueError(f"data file {path!r} holds {array.dtype} values; save a real-valued numeric array")
        matrix = array[:, index].astype(np.float64)
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"data file {path!r}: {int(bad.any(1).sum())} row(s) hold NaN or inf values, the first at row {int(row)} "
            f"(0-based, header excluded), column {names[index[col]]!r}; drop or impute those rows"
        )
    if matrix.shape[0] == 0:
        raise ValueError(f"data file {path!r} holds no rows; pass a file with at least one data row")
    return matrix.astype(np.float32)


def _read_table(path: str, suffix: str):
    import pandas as pd

    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        frame = pd.read_csv(path, header=None, skipinitialspace=True)
    except ImportError as err:
        raise ValueError(f"reading {path!r} needs pyarrow ({err}); pip install pyarrow") from None
    except (OSError, ValueError, pd.errors.ParserError) as err:
        first = " ".join(str(err).split())
        raise ValueError(f"cannot read data file {path!r}: {first}") from None
    # a first row that does not parse as numbers is a header
    first_row = pd.to_numeric(frame.iloc[0], errors="coerce") if len(frame) else None
    if first_row is not None and first_row.isna().any() and not frame.iloc[0].isna().any():
        frame.columns = [str(c).strip() for c in frame.iloc[0]]
        frame = frame.iloc[1:].reset_index(drop=True)
    else:
        frame.columns = [str(c) for c in range(frame.shape[1])]
    return frame


def _select(path: str, names: list[str], columns: str | None) -> list[int]:
    if columns is None:
        return list(range(len(names)))
    chosen = []
    for item in (c.strip() for c in str(columns).split(",")):
        if item in names:
            chosen.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            chosen.append(int(item))
        else:
            raise ValueError(
                f"data file {path!r} has no column {item!r}; its columns are {', '.join(names)} "
                "(pass names or 0-based indices to --columns)"
            )
    if not chosen:
        raise ValueError("--columns is empty; name at least one column, e.g. --columns x,y")
    return chosen


def _numeric(path: str, frame) -> np.ndarray:
    import pandas as pd

    for name in frame.columns:
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = values.isna() & frame[name].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"data file {path!r}: column {name!r} is not numeric (row {row}, 0-based after any header, holds "
                f"{frame[name].iloc[row]!r}); drop it with --columns or fix the value"
            )
    return frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_file(spec: FileSpec, num_components: int | None = None) -> Dataset:
    """Read, split and (optionally) standardize a data file into a Dataset (`mock` is None: no truth).

    Raises:
        ValueError: an unreadable or non-numeric file, NaN rows, or a training split with fewer rows than
            `num_components` (each message names the file, row or column and the fix).
    """
    matrix = torch.from_numpy(read_matrix(spec.path, spec.columns))
    n = matrix.shape[0]
    num_val = round(spec.val_fraction * n)
    if num_components is not None and n - num_val < num_components:
        raise ValueError(
            f"data file {spec.path!r} has {n} rows, {n - num_val} for training after holding out "
            f"val_fraction={spec.val_fraction}: fewer than the {num_components} components; "
            "use fewer components (--components K) or a smaller --val-fraction"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed + 1))
    val_index, train_index = order[:num_val].sort().values, order[num_val:].sort().values
    fingerprint = gmm.fingerprint(matrix)
    data = matrix
    if spec.standardize:
        train = matrix[train_index].double()
        std = train.std(0, unbiased=False)
        if bool((std == 0).any()):
            col = int((std == 0).nonzero()[0, 0])
            raise ValueError(
                f"data file {spec.path!r}: column {col} is constant on the training rows, so it cannot be "
                "standardized; drop it with --columns or leave out --standardize"
            )
        data = ((matrix.double() - train.mean(0)) / std).float()
    empty = torch.zeros(0, dtype=torch.int64)
    return Dataset(
        train=data[train_index],
        val=data[val_index],
        labels_train=empty,
        labels_val=empty,
        mock=None,
        fingerprint=fingerprint,
        spec=spec,
        name=Path(spec.path).name,
        train_index=train_index,
        val_index=val_index,
    )
