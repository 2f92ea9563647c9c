"""Small numeric helpers shared by the metric modules: 0/0 handled explicitly, never a numpy warning."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

NAN = float("nan")


def safe_div(num: float, den: float) -> float:
    """``num / den`` as a Python float, NaN when ``den`` is 0 (the caller decides that 0/0 means "undefined")."""
    return float(num) / float(den) if den != 0 else NAN


def safe_div_array(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Element-wise ``num / den`` in float64 with NaN wherever ``den`` is 0, without a RuntimeWarning."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def nanmean(values: Iterable[float]) -> float:
    """``np.nanmean`` that returns NaN (instead of warning) when every value is NaN or there are none."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(np.mean(arr)) if arr.size else NAN


def is_nan(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def to_builtin(obj):
    """Recursively convert numpy scalars/arrays and NaN to JSON-friendly Python values (NaN → None)."""
    if isinstance(obj, dict):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_builtin(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
