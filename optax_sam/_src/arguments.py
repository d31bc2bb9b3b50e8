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



def _extra_top_key(longer: list[tuple[Any, ...]],
                   shorter: list[tuple[Any, ...]]) -> Optional[str]:
  """The key of ``longer``'s extra top level when it is ``shorter`` nested
  one level down (a mask built on Flax ``variables``), else None."""
  if not longer or len(longer) != len(shorter):
    return None
  first = {p[0] for p in longer if p}
  if len(first) == 1 and all(a[1:] == b for a, b in zip(longer, shorter)):
    return jax.tree_util.keystr(longer[0][:1])
  return None


def structure_difference(tree: Any, params: Any, what: str) -> Optional[str]:
  """Where ``tree`` and ``params`` first differ, or None if they match.

  Names the first key path (in flattening order) at which one tree has a
  leaf and the other does not, e.g. ``params has a leaf at
  ['Dense_1']['bias'] that the mask lacks``, instead of printing both tree
  definitions.

  Args:
    tree: the tree that should have the structure of ``params``.
    params: the parameters.
    what: how to call ``tree`` in the message (``"mask"``, ...).

  Returns:
    None when the structures are equal, else a sentence ending with a period.
  """
  a, b = jax.tree.structure(tree), jax.tree.structure(params)
  if a == b:
    return None
  pa = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  pb = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  keystr = jax.tree_util.keystr
  top = _extra_top_key(pa, pb)
  if top is not None:
    return (f"{what} has an extra top level {top} that params lacks (was it "
            f"built from the whole Flax variables? use variables{top}).")
  top = _extra_top_key(pb, pa)
  if top is not None:
    return (f"params has an extra top level {top} that {what} lacks.")
  sa = set(pa)
  for x, y in zip(pa, pb):
    if x != y:
      if y not in sa:
        return f"params has a leaf at {keystr(y)} that {what} lacks."
      return f"{what} has a leaf at {keystr(x)} that params lacks."
  if len(pa) != len(pb):
    if len(pb) > len(pa):
      return (f"params has a leaf at {keystr(pb[len(pa)])} that {what} "
              "lacks.")
    return f"{what} has a leaf at {keystr(pa[len(pb)])} that params lacks."
  # Same key paths, different node types (a tuple for a list, a None for a
  # dict, ...): name the first path whose container differs.
  for x in pa:
    for depth in range(len(x) + 1):
      sub_a = _subtree(tree, x[:depth])
      sub_b = _subtree(params, x[:depth])
      if type(sub_a) is not type(sub_b):
        return (f"at {keystr(x[:depth]) or 'the root'} {what} has a "
                f"{type(sub_a).__name__} where params has a "
                f"{type(sub_b).__name__}.")
  return f"{what} has the tree structure {a} where params has {b}."


def _subtree(tree: Any, path: tuple[Any, ...]) -> Any:
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    tree = getattr(tree, k) if isinstance(k, str) and not hasattr(
        tree, "__getitem__") else tree[k]
  return tree


def check_same_structure(tree: Any, params: Any, what: str,
                         hint: str = "") -> None:
  """Raises a ``ValueError`` naming the first key path where ``tree`` and
  ``params`` differ (see :func:`structure_difference`); ``hint`` is
  appended to the message."""
  difference = structure_difference(tree, params, what)
  if difference is not None:
    raise ValueError(f"{what} must have the same tree structure as params: "
                     f"{difference}" + (f" {hint}" if hint else ""))


# Flax NNX trees (duck-typed: the core does not import flax).
FLAX_HINT = (
    "optax_sam's core works on arrays: use optax_sam.nnx.grad_fn(model, "
    "loss_fn, *batch) (C1) or optax_sam.nnx.make_update(loss_fn) (C2), or "
    "strip the wrappers with nnx.as_pure(...).")


def is_flax_variable(x: Any) -> bool:
  """Whether ``x`` is a ``flax.nnx.Variable`` (``Param``, ``BatchStat``...)."""
  t = type(x)
  return (t.__module__.startswith("flax.")
          and any(c.__name__ == "Variable" for c in t.__mro__))


def holds_flax_variables(tree: Any) -> bool:
  """Whether any node of ``tree`` is a ``flax.nnx.Variable``."""
  return any(is_flax_variable(x)
             for x in jax.tree.leaves(tree, is_leaf=is_flax_variable))


def unwrap_flax_variables(tree: Any) -> Any:
  """``tree`` with each ``flax.nnx.Variable`` replaced by its array (what
  ``nnx.as_pure`` does); ``tree`` itself when it holds none.

  ``nnx.Optimizer`` calls ``tx.init`` on ``Param``-wrapped state but
  ``tx.update`` on pure state: unwrapping in ``init`` makes both see the
  same tree (the same layer groups).
  """
  if not holds_flax_variables(tree):
    return tree

  def unwrap(x):
    if not is_flax_variable(x):
      return x
    raw = getattr(x, "get_raw_value", None)
    return raw() if callable(raw) else x.value

  return jax.tree.map(unwrap, tree, is_leaf=is_flax_variable)


def flax_variables_difference(tree: Any, params: Any,
                              what: str) -> Optional[str]:
  """A short message when one of ``tree`` and ``params`` holds
  ``flax.nnx.Variable`` wrappers and the other does not, else None."""
  a, b = holds_flax_variables(tree), holds_flax_variables(params)
  if a == b:
    return None
  wrapped, plain = (what, "params") if a else ("params", what)
  return (f"{wrapped} holds flax.nnx Variables (Param, ...) where {plain} "
          f"holds arrays. {FLAX_HINT}")
