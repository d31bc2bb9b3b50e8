"""Perturbation (ascent) transforms: gradient -> perturbation ``eps``.

Each function here returns an ordinary ``optax.GradientTransformation`` that
maps a gradient ``g`` (at parameters ``w``) to the perturbation ``eps`` that a
sharpness-aware method adds to ``w`` before its second gradient pass:

* :func:`normalize`: ``g / ||g||``, globally or per layer group, safe for zero,
  tiny and huge gradients (the norm is computed in float32 after scaling by
  the largest magnitude, so it neither underflows nor overflows).
* :func:`scale_by_rho`: multiply by ``rho`` (a constant or a schedule).
* :func:`scale_by_parameter_magnitude`: ASAM's elementwise ``T_w = |w| + eta``.
* :func:`sam_perturbation`: ``rho * g / ||g||`` (Foret et al., 2021).
* :func:`asam_perturbation`: ``rho * T_w^2 g / ||T_w g||`` (Kwon et al., 2021).

A perturbation restricted to a subset of layers is the same transform run on a
gradient whose unselected leaves are zero (they then contribute nothing to any
norm); the two-pass engine keeps the unselected parameters untouched so the
compiled program does no work for them (see ``step.py``).

References:
  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

  Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
  Scale-Invariant Learning of Deep Neural Networks
  <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import groups as groups_lib

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def check_rho(rho: ScalarOrSchedule, name: str = "rho") -> None:
  """Raises ``ValueError`` for a concrete ``rho`` that is not a finite number
  > 0. A schedule, or a traced value (``optax.inject_hyperparams`` in a
  jitted step), is guarded at run time instead (see :func:`scale_by_rho`)."""
  if callable(rho) or args_lib.is_traced(rho):
    return
  try:
    value = float(np.asarray(rho))  # Python numbers and concrete arrays.
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be > 0 and finite, got {rho!r}.") from None
  if value == 0:
    raise ValueError(
        f"{name} must be > 0, got 0. (A radius of 0 is the base optimizer at "
        "twice the cost: use the base optimizer instead.)")
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(f"{name} must be > 0 and finite, got {value}.")


def guard_radius(rho: jax.Array) -> jax.Array:
  """``rho`` where it is finite and >= 0, else 0 (no perturbation)."""
  rho = jnp.asarray(rho, jnp.float32)
  return jnp.where(jnp.isfinite(rho) & (rho >= 0), rho, 0.0)


def safe_norm(tree: PyTree) -> jax.Array:
  """L2 norm over all leaves of ``tree`` in float32, robust to tiny values.

  Computes ``m * sqrt(sum((x / m)^2))`` with ``m = max |x|`` so that neither
  very small (bf16/fp16 or 1e-30) nor very large gradients under- or
  overflow. Returns exactly 0 for an all-zero tree, and NaN (inf) when a
  leaf holds a NaN (an inf), so a non-finite gradient stays visible in every
  statistic built on this norm.
  """
  leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  m = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) if x.size else 0.0
                         for x in leaves]))
  # Divide (not multiply by 1/m): XLA's simplifier may otherwise pull the
  # factor out of the sum, giving inf * 0 = NaN for constant tiny inputs.
  safe_m = jnp.where(m > 0, m, 1.0)
  sq = sum(jnp.sum(jnp.square(x / safe_m)) for x in leaves)
  # m is NaN when a leaf holds a NaN (max propagates it), inf for an inf.
  return jnp.where(jnp.isfinite(m) & (m > 0), m * jnp.sqrt(sq), m)


def safe_inverse(norm: jax.Array) -> jax.Array:
  """``1 / norm``, and 0 where ``norm`` is 0 or not finite."""
  ok = jnp.logical_and(norm > 0, jnp.isfinite(norm))
  return jnp.where(ok, 1.0 / jnp.where(ok, norm, 1.0), 0.0)


def _scale_leaves(tree: PyTree, factor: jax.Array) -> PyTree:
  return jax.tree.map(
      lambda x: (jnp.asarray(x, jnp.float32) * factor).astype(x.dtype), tree)


NormalizeState = optax.EmptyState


def normalize(
    labels: groups_lib.Labels = None,
    *,
    per_layer: bool = False,
) -> optax.GradientTransformation:
  """Divides updates by their L2 norm (global, or per layer group).

  Zero updates stay zero (no NaN). The norm is taken in float32 and the
  result is cast back to each leaf's dtype.

  Args:
    labels: layer labels for ``per_layer=True`` (see
      :func:`optax_sam.layer_groups`); default: leaves sharing a parent path.
    per_layer: if True, each layer group is normalized on its own, so every
      group's perturbation has norm 1 (before scaling by ``rho``).

  Returns:
    An ``optax.GradientTransformation``.
  """

  def init_fn(params):
    del params
    return NormalizeState()

  def update_fn(updates, state, params=None):
    del params
    if not per_layer:
      return _scale_leaves(updates, safe_inverse(safe_norm(updates))), state
    labs = groups_lib.leaf_labels(updates, labels)
    flat, treedef = jax.tree.flatten(updates)
    out = [(jnp.asarray(x, jnp.float32) * safe_inverse(n)).astype(x.dtype)
           for x, n in zip(flat, groups_lib.norms_per_leaf(updates, labs))]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByRhoState(NamedTuple):
  """State of :func:`scale_by_rho` with a schedule: the step count."""
  count: jax.Array


def scale_by_rho(rho: ScalarOrSchedule) -> optax.GradientTransformation:
  """Multiplies updates by ``rho`` (a positive constant or a schedule).

  A constant must be a finite number > 0 (``ValueError`` otherwise). A value
  known only at run time (a schedule's value, or a traced ``rho`` from
  ``optax.inject_hyperparams``) cannot be checked then: where it is NaN,
  infinite or negative the radius is taken as 0, i.e. no perturbation (the
  step descends along the gradient at ``w``), instead of making the
  parameters NaN or ascending in the opposite direction.
  """
  check_rho(rho)
  if not callable(rho):
    if isinstance(rho, (int, float)):
      return optax.scale(rho)
    rho_value = rho
    rho = lambda count: rho_value  # arrays: guarded like a schedule's value

  def init_fn(params):
    del params
    return ScaleByRhoState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    factor = guard_radius(rho(state.count))
    return _scale_leaves(updates, factor), ScaleByRhoState(
        count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_parameter_magnitude(
    eta: float = 0.01,
    adaptive_mask: Optional[groups_lib.MaskOrFn] = None,
) -> optax.GradientTransformation:
  """Multiplies updates elementwise by ``T_w = |w| + eta`` (ASAM).

  Args:
    eta: the offset that keeps ``T_w`` positive (ASAM's ``eta``).
    adaptive_mask: optional pytree of bools (or ``params -> mask``) choosing
      the leaves that get ``T_w``; the others use ``T_w = 1``. The ASAM
      authors' code scales only weight tensors, not biases; the default here
      scales every leaf, as the paper's formula is written.

  Returns:
    An ``optax.GradientTransformation`` that needs ``params``.
  """
  eta = args_lib.check_number(eta, "eta", 0.0)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("ASAM's perturbation needs params: call update with "
                       "params.")
    if adaptive_mask is None:
      mask = jax.tree.map(lambda _: True, params)
    else:
      mask = groups_lib.resolve_mask(adaptive_mask, params,
                                     what="adaptive_mask")
    def scale(g, w, m):
      if not m:
        return g
      t = jnp.abs(jnp.asarray(w, jnp.float32)) + eta
      return (jnp.asarray(g, jnp.float32) * t).astype(g.dtype)
    return jax.tree.map(scale, updates, params, mask), state

  return optax.GradientTransformation(init_fn, update_fn)


def sam_perturbation(
    rho: ScalarOrSchedule = 0.05,
    *,
    per_layer: bool = False,
    labels: groups_lib.Labels = None,
) -> optax.GradientTransformation:
  """SAM's ascent step ``eps = rho * g / ||g||``.

  Args:
    rho: the neighbourhood radius (constant or schedule), > 0 (a schedule's
      non-finite or negative value counts as 0, see :func:`scale_by_rho`).
    per_layer: normalize each layer group separately (each selected layer's
      perturbation then has norm ``rho``) instead of over all leaves.
    labels: layer labels when ``per_layer`` is True.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return optax.chain(normalize(labels, per_layer=per_layer),
                     scale_by_rho(rho))


def asam_perturbation(
    rho: ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    adaptive_mask: Optional[groups_lib.MaskOrFn] = None,
    per_layer: bool = False,
    labels: groups_lib.Labels = None,
) -> optax.GradientTransformation:
  """ASAM's ascent step ``eps = rho * T_w^2 g / ||T_w g||``.

  ``T_w g`` is computed after dividing ``g`` by its largest magnitude (per
  normalization group), which does not change ``eps`` but keeps ``|w| |g|``
  from overflowing for huge gradients (``1e30``) or float16 leaves; a NaN or
  infinite gradient still gives a non-finite ``eps`` (a reported non-finite
  step, see :class:`optax_sam.SharpnessAwareState`).

  Args:
    rho: the neighbourhood radius, as in :func:`sam_perturbation`.
    eta: ``T_w = |w| + eta``.
    adaptive_mask: leaves that get ``T_w`` (others use 1), see
      :func:`scale_by_parameter_magnitude`.
    per_layer: normalize ``T_w g`` per layer group instead of globally.
    labels: layer labels when ``per_layer`` is True.

  Returns:
    An ``optax.GradientTransformation`` (it needs ``params``).

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  t = scale_by_parameter_magnitude(eta, adaptive_mask)
  return optax.chain(
      _prescaled_parameter_magnitude(t, labels, per_layer),
      normalize(labels, per_layer=per_layer), t, scale_by_rho(rho))


def _prescaled_parameter_magnitude(
    t: optax.GradientTransformation, labels: groups_lib.Labels,
    per_layer: bool) -> optax.GradientTransformation:
  """``T_w (g / m)``, ``m`` the largest ``|g|`` of each normalization group
  (global, or per layer group with ``per_layer``).

  The normalization that follows is invariant to a positive factor per
  group, so this is ASAM's ``T_w g`` up to that factor; computed this way
  ``T_w g`` neither overflows (a ``1e30`` gradient, or a float16 leaf
  where ``|w| |g| > 65504``) nor underflows. State: ``t``'s.
  """

  def update_fn(updates, state, params=None):
    leaves, treedef = jax.tree.flatten(updates)
    tops = [jnp.max(jnp.abs(jnp.asarray(x, jnp.float32))) if x.size
            else jnp.zeros([], jnp.float32) for x in leaves]
    labs = groups_lib.leaf_labels(updates, labels, per_layer)
    maxes = groups_lib.reduce_per_leaf(
        tops, labs, lambda xs: jnp.max(jnp.stack(xs)))
    # Computed in float32 (T_w g / m <= T_w): cast to the leaf's dtype by t.
    scaled = [jnp.asarray(x, jnp.float32) / jnp.where(m > 0, m, 1.0)
              for x, m in zip(leaves, maxes)]
    out, state = t.update(jax.tree.unflatten(treedef, scaled), state, params)
    return jax.tree.map(lambda o, x: o.astype(x.dtype), out, updates), state

  return optax.GradientTransformation(t.init, update_fn)
