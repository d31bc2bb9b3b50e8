"""Checks of the factories' arguments.

``optax.inject_hyperparams(factory)(...)`` hands every numeric argument of
the factory to it as a jax array (integers and defaults included, unless
listed in ``static_args``), and inside a jitted ``update`` as a *traced* one.
A check can only read a concrete value, so the helpers here validate Python
numbers and concrete arrays, and let a traced value through unchanged: the
code that uses an argument must then work with an array too (e.g.
``policies.top_k_mask`` takes a traced ``k``). Under ``inject_hyperparams``
the values are checked when ``init`` builds the transformation from concrete
arrays (and on every update that is not jitted).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a tracer (its value is unknown at trace time)."""
  return isinstance(value, jax.core.Tracer)


def _scalar(value: Any, name: str, what: str) -> Optional[np.ndarray]:
  """``value`` as a 0-d numpy array, or None when it is traced."""
  if is_traced(value):
    return None
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be {what}, got {value!r}.")
  try:
    arr = np.asarray(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be {what}, got {value!r}.") from None
  if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"{name} must be {what}, got {value!r}.")
  return arr


def check_int(value: Any, name: str, minimum: int) -> Any:
  """An integer ``>= minimum`` as a Python int; a traced value unchanged."""
  what = f"an integer >= {minimum}"
  arr = _scalar(value, name, what)
  if arr is None:
    return value
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must be {what}, got {value!r}.")
  if int(arr) < minimum:
    raise ValueError(f"{name} must be {what}, got {int(arr)}.")
  return int(arr)


def check_number(value: Any, name: str, low: Optional[float] = None,
                 high: Optional[float] = None, *, low_open: bool = False,
                 high_open: bool = False) -> Any:
  """A finite number in the given interval, as a Python float; a traced value
  unchanged.

  ``low``/``high`` of None leave that side unbounded; ``low_open``/
  ``high_open`` exclude the bound itself.
  """
  if low is not None and high is not None:
    what = (f"a finite number in {'(' if low_open else '['}{low:g}, "
            f"{high:g}{')' if high_open else ']'}")
  elif low is not None:
    what = f"a finite number {'>' if low_open else '>='} {low:g}"
  elif high is not None:
    what = f"a finite number {'<' if high_open else '<='} {high:g}"
  else:
    what = "a finite number"
  arr = _scalar(value, name, what)
  if arr is None:
    return value
  v = float(arr)
  ok = math.isfinite(v)
  if ok and low is not None:
    ok = v > low if low_open else v >= low
  if ok and high is not None:
    ok = v < high if high_open else v <= high
  if not ok:
    raise ValueError(f"{name} must be {what}, got {v}.")
  return v
