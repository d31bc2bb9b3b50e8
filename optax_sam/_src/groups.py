"""Layer groups: which parameter leaves form a "layer", and masks over layers.

A *layer* is a group of parameter leaves. By default leaves that share a
parent path form one group: ``params/Dense_0/kernel`` and
``params/Dense_0/bias`` are the layer ``params/Dense_0``. Users may instead
give labels as a pytree of strings shaped like the parameters, or as a
function of a leaf's key path, in the spirit of ``optax.multi_transform``.

Groups have an order (parameter-tree order by default, i.e. the order in which
``jax.tree`` flattens the parameters, overridable), because several methods
reason about depth. Note that ``jax`` flattens dicts by sorted key, so Flax's
auto-names ``Dense_10`` sort before ``Dense_2``; pass ``order=natural_order``
or an explicit list when that matters.

A *mask* is a pytree of Python ``bool`` shaped like the parameters. Masks are
static (Python values, not arrays), so that the compiled program can drop the
work for unselected leaves entirely.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from optax_sam._src import arguments

PyTree = Any
KeyPath = tuple[Any, ...]
Labels = Union[None, PyTree, Callable[[tuple[str, ...]], str]]
MaskOrFn = Union[None, PyTree, Callable[[PyTree], PyTree]]


def key_to_str(key: Any) -> str:
  """Renders one ``jax.tree_util`` key entry as a plain string."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path: KeyPath) -> tuple[str, ...]:
  """Key path (as from ``tree_flatten_with_path``) as a tuple of strings."""
  return tuple(key_to_str(k) for k in path)


def default_label(names: tuple[str, ...]) -> str:
  """The default layer label of a leaf: its parent path joined with ``/``.

  A leaf at the top level (no parent) is its own layer.
  """
  if len(names) <= 1:
    return "/".join(names) if names else "<root>"
  return "/".join(names[:-1])


def natural_order(name: str) -> tuple[Any, ...]:
  """Sort key that orders ``Dense_2`` before ``Dense_10``."""
  return tuple(int(t) if t.isdigit() else t
               for t in re.split(r"(\d+)", name))


class LayerGroups(NamedTuple):
  """Static description of the layer groups of a parameter pytree.

  Attributes:
    names: group names in depth order (input side first by convention).
    labels: pytree shaped like the parameters; each leaf is its group name.
    sizes: number of scalar parameters per group, aligned with ``names``.
    treedef: the parameters' tree structure.
  """
  names: tuple[str, ...]
  labels: PyTree
  sizes: tuple[int, ...]
  treedef: Any

  @property
  def num_groups(self) -> int:
    return len(self.names)

  def index(self, name: str) -> int:
    return self.names.index(name)

  def describe(self) -> list[tuple[str, int]]:
    """``[(name, num_params), ...]`` in depth order."""
    return list(zip(self.names, self.sizes))

  def mask(self, selected: Iterable[Union[str, int]]) -> PyTree:
    """A pytree of bools, True on the leaves of the selected groups."""
    return mask_from_names(self, selected)

  def leaf_group_indices(self) -> list[int]:
    """For each leaf (in flatten order), the depth position of its group."""
    pos = {n: i for i, n in enumerate(self.names)}
    return [pos[lab] for lab in jax.tree.leaves(self.labels)]

  def mask_from_flags(self, flags: Sequence[bool]) -> PyTree:
    """Leaf mask (Python bools) from one static flag per group."""
    flags = [bool(f) for f in flags]
    if len(flags) != self.num_groups:
      raise ValueError(f"need {self.num_groups} group flags, got "
                       f"{len(flags)}.")
    return jax.tree.unflatten(
        self.treedef, [flags[i] for i in self.leaf_group_indices()])

  def leaf_selection(self, selection: Any) -> PyTree:
    """Per-leaf scalar bools from a (traced) bool[L] group selection."""
    return jax.tree.unflatten(
        self.treedef, [selection[i] for i in self.leaf_group_indices()])

  def sq_norms(self, tree: PyTree) -> Any:
    """float32[L]: squared L2 norm of ``tree``'s leaves, summed per group."""
    out = jnp.zeros(self.num_groups, jnp.float32)
    for i, leaf in zip(self.leaf_group_indices(), jax.tree.leaves(tree)):
      out = out.at[i].add(jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32))))
    return out


_MASK_HINT = ("Build masks from the params passed to tx.init, e.g. "
              "optax_sam.layer_groups(params).mask(['Dense_1']).")


def _resolve_labels(params: PyTree, labels: Labels) -> PyTree:
  """Returns a pytree of strings shaped like ``params``."""
  if labels is None or callable(labels):
    fn = default_label if labels is None else labels
    return jax.tree_util.tree_map_with_path(
        lambda p, _: str(fn(path_names(p))), params)
  arguments.check_same_structure(
      labels, params, "labels",
      "Pass labels shaped like params, or a function of the key path.")
  return jax.tree.map(str, labels)


def layer_groups(
    params: PyTree,
    labels: Labels = None,
    order: Union[None, Sequence[str], Callable[[str], Any]] = None,
) -> LayerGroups:
  """Groups the leaves of ``params`` into layers.

  Args:
    params: a parameter pytree (arrays or shape-dtype structs).
    labels: ``None`` (leaves sharing a parent path form a group), a pytree of
      strings shaped like ``params``, or a function of a leaf's key path given
      as a tuple of strings, e.g. ``lambda path: path[1]``.
    order: ``None`` for parameter-tree order (first appearance when
      flattened), a sequence listing every group name in the wanted order, or
      a sort-key function of the group name such as :func:`natural_order`.

  Returns:
    A :class:`LayerGroups`.

  Raises:
    ValueError: if ``params`` has no leaves, or ``labels``/``order`` do not
      match ``params``.
  """
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError("params has no leaves: there is no layer to group.")
  label_tree = _resolve_labels(params, labels)
  label_leaves = jax.tree.leaves(label_tree)
  names: list[str] = []
  sizes: dict[str, int] = {}
  for lab, leaf in zip(label_leaves, leaves):
    if lab not in sizes:
      names.append(lab)
      sizes[lab] = 0
    sizes[lab] += int(np.prod(np.shape(leaf), dtype=np.int64))
  if order is not None:
    if callable(order):
      names = sorted(names, key=order)
    else:
      order = [str(o) for o in order]
      if sorted(order) != sorted(names):
        raise ValueError(
            f"order must list every group exactly once; groups are {names}, "
            f"order is {order}.")
      names = list(order)
  return LayerGroups(tuple(names), label_tree,
                     tuple(sizes[n] for n in names), treedef)


def mask_from_names(groups: LayerGroups,
                    selected: Iterable[Union[str, int]]) -> PyTree:
  """Pytree of Python bools: True on leaves whose group is in ``selected``.

  ``selected`` holds group names or integer positions in depth order
  (negative positions count from the output side).
  """
  chosen = set()
  for s in selected:
    if isinstance(s, (int, np.integer)):
      chosen.add(groups.names[int(s)])
    elif s in groups.names:
      chosen.add(s)
    else:
      near = [n for n in groups.names if n.endswith(f"/{s}")]
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      if near and near[0].startswith("params/"):
        hint = (f" (did you mean {near[0]!r}? groups built on the whole "
                "Flax variables carry its 'params/' level: build them on "
                "variables['params'])")
      raise ValueError(f"unknown layer group {s!r}; groups are "
                       f"{list(groups.names)}{hint}.")
  if not chosen:
    raise ValueError("the selection is empty: select at least one layer.")
  return jax.tree.map(lambda lab: lab in chosen, groups.labels)


def resolve_mask(mask: MaskOrFn, params: PyTree, *,
                 what: str = "mask") -> PyTree:
  """Turns ``mask`` (pytree of bools or ``params -> mask``) into a bool tree.

  ``None`` means every leaf. The result has Python bools as leaves and is
  validated: same structure as ``params`` and at least one True leaf.
  """
  treedef = jax.tree.structure(params)
  if mask is None:
    return jax.tree.unflatten(treedef, [True] * treedef.num_leaves)
  if callable(mask):
    mask = mask(params)
  arguments.check_same_structure(mask, params, what, _MASK_HINT)
  leaves = []
  for m in jax.tree.leaves(mask):
    if isinstance(m, jax.core.Tracer):
      raise TypeError(
          f"{what} must hold Python bools known at trace time (a static "
          "selection), not traced arrays.")
    leaves.append(bool(np.asarray(m)))
  if not any(leaves):
    raise ValueError(f"{what} selects no parameter: select at least one layer.")
  return jax.tree.unflatten(treedef, leaves)


def mask_fraction(mask: PyTree, params: PyTree) -> float:
  """Fraction of scalar parameters whose leaf is selected by ``mask``."""
  sizes = [int(np.prod(np.shape(p), dtype=np.int64))
           for p in jax.tree.leaves(params)]
  flags = jax.tree.leaves(mask)
  total = sum(sizes)
  return sum(s for s, f in zip(sizes, flags) if f) / max(total, 1)


# ------------------------------------------------ per-group arithmetic
#
# The one place where a tree's leaves are reduced per layer group; mixers,
# perturbations and the engine's statistics use these.


def leaf_labels(tree: PyTree, labels: Labels = None,
                per_group: bool = True) -> Union[list[str], None]:
  """The group label of each leaf (flatten order), or None for one global
  group (``per_group=False``)."""
  if not per_group:
    return None
  return jax.tree.leaves(layer_groups(tree, labels).labels)


def f32(x: Any) -> Any:
  """``x`` as a float32 array."""
  return jnp.asarray(x, jnp.float32)


def reduce_per_leaf(parts: Sequence[Any],
                    label_leaves: Union[Sequence[str], None],
                    combine: Callable[[list[Any]], Any]) -> list[Any]:
  """For each leaf, ``combine`` of the ``parts`` of the leaves in its group
  (of every leaf when ``label_leaves`` is None)."""
  parts = list(parts)
  if label_leaves is None:
    total = combine(parts)
    return [total] * len(parts)
  by_group: dict[str, list[int]] = {}
  for i, lab in enumerate(label_leaves):
    by_group.setdefault(lab, []).append(i)
  out: list[Any] = [None] * len(parts)
  for idx in by_group.values():
    value = combine([parts[i] for i in idx])
    for i in idx:
      out[i] = value
  return out


def norms_per_leaf(tree: PyTree, label_leaves: Union[Sequence[str], None]
                   ) -> list[Any]:
  """For each leaf, the (safe, float32) L2 norm of its group."""
  from optax_sam._src import perturb as perturb_lib  # pylint: disable=g-import-not-at-top
  return reduce_per_leaf(jax.tree.leaves(tree), label_leaves,
                         perturb_lib.safe_norm)


def dots_per_leaf(a: PyTree, b: PyTree,
                  label_leaves: Union[Sequence[str], None]) -> list[Any]:
  """For each leaf, ``<a, b>`` summed over its group (float32)."""
  parts = [jnp.sum(f32(x) * f32(y))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return reduce_per_leaf(parts, label_leaves, sum)



def _params_like(params: PyTree) -> Callable[[Any], bool]:
  """Predicate: a subtree shaped like ``params`` (same structure, shapes)."""
  treedef = jax.tree.structure(params)
  shapes = [np.shape(p) for p in jax.tree.leaves(params)]

  def check(x: Any) -> bool:
    if jax.tree.structure(x) != treedef:
      return False
    return [np.shape(v) for v in jax.tree.leaves(x)] == shapes

  return check


def keep_where(active: PyTree, new: PyTree, old: PyTree,
               params: PyTree) -> PyTree:
  """``new`` where ``active`` and ``old`` elsewhere, in every part of an
  optimizer state shaped like ``params`` (momenta, Adam moments, ...).

  ``active`` holds one scalar bool per parameter leaf (static or traced).
  Parts of the state that are not shaped like the parameters (step counts,
  injected hyper-parameters) take ``new``. Works for any optax state: the
  parameter-shaped parts are found by structure, not by type.
  """
  like = _params_like(params)

  def pick(n, o):
    if not like(n):
      return n
    return jax.tree.map(
        lambda a, b, m: a if m is True else (
            b if m is False else jnp.where(m, a, b)), n, o, active)

  return jax.tree.map(pick, new, old, is_leaf=like)
