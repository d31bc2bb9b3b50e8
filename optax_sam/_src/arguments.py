"""Checks of the factories' arguments, and PRNG keys from seeds.

``optax.inject_hyperparams(factory)(...)`` hands every numeric argument of
the factory to it as a jax array (integers and defaults included, unless
listed in ``static_args``), and inside a jitted ``update`` as a *traced* one.
A check can only read a concrete value, so the helpers here validate Python
numbers and concrete arrays, and let a traced value through unchanged: the
code that uses an argument must then work with an array too (e.g.
``policies.top_k_mask`` takes a traced ``k``). Under ``inject_hyperparams``
the values are checked when ``init`` builds the transformation from concrete
arrays (and on every update that is not jitted).

Seeds and keys: everywhere a seed is taken, an integer, a raw ``uint32`` key
(``jax.random.PRNGKey``) and a typed key (``jax.random.key``) are accepted;
:func:`as_key` keeps a key's kind (a typed key stays typed).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

SeedOrKey = Union[int, jax.Array]


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


def is_key(value: Any) -> bool:
  """Whether ``value`` is a typed PRNG key array (``jax.random.key``)."""
  dtype = getattr(value, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype,
                                                     jax.dtypes.prng_key)


def as_key(seed_or_key: Optional[SeedOrKey] = None) -> jax.Array:
  """A PRNG key from a seed (int, possibly a jax integer scalar), a raw
  ``uint32`` key or a typed key; None is seed 0.

  A typed key is returned as it is and a raw key as ``uint32``: the state
  then holds the kind of key the user gave.
  """
  if seed_or_key is None:
    seed_or_key = 0
  if is_key(seed_or_key):
    return seed_or_key
  if isinstance(seed_or_key, (bool, np.bool_)):
    raise TypeError(f"a seed must be an integer or a PRNG key, got "
                    f"{seed_or_key!r}.")
  if isinstance(seed_or_key, (int, np.integer)):
    return jax.random.PRNGKey(int(seed_or_key))
  arr = jnp.asarray(seed_or_key)
  if not jnp.issubdtype(arr.dtype, jnp.integer):
    raise TypeError(f"a seed must be an integer or a PRNG key, got "
                    f"{seed_or_key!r}.")
  if arr.ndim == 0:  # an integer seed given as an array (inject_hyperparams)
    return jax.random.PRNGKey(arr)
  return arr.astype(jnp.uint32)  # a raw key


def same_seed(a: SeedOrKey, b: SeedOrKey) -> Optional[bool]:
  """Whether two seeds or keys give the same key; None if either is traced."""
  if is_traced(a) or is_traced(b):
    return None
  ka, kb = as_key(a), as_key(b)
  ka = np.asarray(jax.random.key_data(ka) if is_key(ka) else ka)
  kb = np.asarray(jax.random.key_data(kb) if is_key(kb) else kb)
  return ka.shape == kb.shape and bool(np.all(ka == kb))


def renamed(new_value: Any, old_value: Any, new: str, old: str,
            default: Any) -> Any:
  """Resolves an argument renamed from ``old`` to ``new`` (one release of
  deprecation): warns when ``old`` is used, raises when both are given.

  ``new_value`` (``old_value``) is None when the caller left ``new``
  (``old``) out.
  """
  if old_value is None:
    return default if new_value is None else new_value
  if new_value is not None:
    raise TypeError(f"got both {new}= and its deprecated name {old}=; pass "
                    f"{new}= only.")
  warnings.warn(f"{old}= is deprecated; use {new}=.", DeprecationWarning,
                stacklevel=3)
  return old_value

