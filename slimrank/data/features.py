"""Build feature-table columns from raw values: categorical codes, multi-hot, numeric, buckets.

Conventions shared by every loader: categorical code 0 is ``"[UNK]"`` (missing or unseen) and
the other codes follow the sorted vocabulary; numeric columns are raw values with missing
entries set to the median of the present ones, plus a ``<name>_missing`` 0/1 column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from slimrank.data.dataset import FeatureTable

UNKNOWN = "[UNK]"

# MovieLens-1M's age groups, applied to ages in years: [lower, next lower).
AGE_EDGES = (18, 25, 35, 45, 50, 56)
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


def categorical_codes(
    values: Sequence[object] | np.ndarray, order: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Return int64 codes ``(n,)`` and the vocabulary; missing (None/NaN/"") gets code 0.

    The vocabulary is ``[UNK]`` then ``order`` (values outside it become ``[UNK]``) or, without
    ``order``, the sorted distinct values.
    """
    series = pd.Series(np.asarray(values, dtype=object))
    present = series.notna() & (series.astype(str) != "")
    if order is not None:
        present &= series.astype(str).isin(list(order))
    text = series[present].astype(str)
    vocab = [UNKNOWN, *(order if order is not None else sorted(set(text)))]
    lookup = {name: code for code, name in enumerate(vocab)}
    codes = np.zeros(len(series), dtype=np.int64)  # (n,)
    codes[present.to_numpy()] = text.map(lookup).to_numpy(dtype=np.int64)
    return codes, vocab


def multi_hot(token_lists: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """Return a float32 ``(n, m)`` 0/1 matrix and its m column names (sorted tokens)."""
    vocab = sorted({tok for tokens in token_lists for tok in tokens})
    lookup = {name: j for j, name in enumerate(vocab)}
    out = np.zeros((len(token_lists), len(vocab)), dtype=np.float32)  # (n, m)
    rows = [i for i, tokens in enumerate(token_lists) for _ in tokens]
    cols = [lookup[tok] for tokens in token_lists for tok in tokens]
    out[rows, cols] = 1.0
    return out, vocab


def numeric_with_missing(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(filled, missing)``, float32 ``(n,)``: NaNs set to the median, and a 0/1 flag."""
    values = np.asarray(values, dtype=np.float64)
    missing = ~np.isfinite(values)
    fill = float(np.median(values[~missing])) if (~missing).any() else 0.0
    filled = np.where(missing, fill, values).astype(np.float32)
    return filled, missing.astype(np.float32)


def age_buckets(ages: np.ndarray) -> np.ndarray:
    """Return the age-group label of each age in years (object ``(n,)``, None when missing)."""
    ages = np.asarray(ages, dtype=np.float64)
    labels = np.asarray(AGE_LABELS, dtype=object)[np.searchsorted(AGE_EDGES, ages, side="right")]
    labels[~np.isfinite(ages)] = None
    return labels


def scatter_rows(values: np.ndarray, index: np.ndarray, n_rows: int, fill: object) -> np.ndarray:
    """Return ``n_rows`` rows with ``values[j]`` at row ``index[j]`` and ``fill`` elsewhere."""
    values = np.asarray(values)
    out = np.empty((n_rows, *values.shape[1:]), dtype=values.dtype)
    out[...] = fill
    out[index] = values
    return out


def table_from_frame(frame: pd.DataFrame, index: np.ndarray, n_rows: int) -> FeatureTable:
    """Return a table of ``n_rows`` rows from feature columns whose rows sit at ``index``.

    Column kinds: numeric dtype -> numeric (median-filled, plus ``<name>_missing``); list
    values (Parquet lists) or strings containing ``"|"`` -> multi-hot over ``"|"``-separated
    tokens; anything else -> categorical. Rows not in ``index`` are unknown / missing.
    """
    categorical: dict[str, np.ndarray] = {}
    cardinality: dict[str, int] = {}
    numeric: dict[str, np.ndarray] = {}
    hot: dict[str, np.ndarray] = {}
    vocab: dict[str, list[str]] = {}
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
            raw = scatter_rows(column.to_numpy(dtype=np.float64), index, n_rows, np.nan)
            numeric[name], numeric[f"{name}_missing"] = numeric_with_missing(raw)
            continue
        is_list = column.map(lambda v: isinstance(v, list | tuple | np.ndarray)).any()
        is_piped = column.map(lambda v: isinstance(v, str) and "|" in v).any()
        if is_list or is_piped:
            lists = [_tokens(v) for v in column]
            matrix, names = multi_hot(lists)
            hot[name] = scatter_rows(matrix, index, n_rows, 0.0)
            vocab[name] = names
            continue
        codes, names = categorical_codes(column.to_numpy(dtype=object))
        categorical[name] = scatter_rows(codes, index, n_rows, 0)
        cardinality[name] = len(names)
        vocab[name] = names
    return FeatureTable(n_rows, categorical, cardinality, numeric, hot, vocab)


def _tokens(value: object) -> list[str]:
    """Return the tokens of a multi-hot cell: a list, or a ``"|"``-separated string."""
    if isinstance(value, list | tuple | np.ndarray):
        return [str(v) for v in value if v is not None and str(v) != ""]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [tok for tok in str(value).split("|") if tok]
