"""Vanilla SAM, and the generic two-pass sharpness-aware transformation.

:func:`sharpness_aware` composes a base optimizer with any perturbation
transform (``perturb.py``) restricted to a static subset of layers:

1. clean pass: ``g = grad L(w)`` for the perturbed leaves only;
2. ascent: ``eps = perturbation(g)``; ``w_adv = w + eps`` on those leaves;
3. descent pass: ``g_sam = grad L(w_adv)`` for every leaf;
4. ``updates = optimizer.update(g_sam, opt_state, w)``.

:func:`sam` and :func:`optax_sam.asam` are this with SAM's and ASAM's
perturbations; :func:`plain` is the one-pass baseline (no perturbation), so
SGD runs through the same harness as every method.

Data parallelism (``axis_name``): the descent gradient is averaged over the
axis; the ascent gradient stays local to each device (m-sharpness, as in the
SAM authors' code) unless ``sync_ascent=True``. In C1 pass the *local*
gradient and a *local* ``grad_fn``; the transformation averages what must be
averaged.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import optax

from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import step as step_lib

PyTree = Any


def as_extra_args(optimizer: Any) -> optax.GradientTransformationExtraArgs:
  """Accepts a GradientTransformation, with or without extra args, or an
  ``optax.MultiSteps`` object, and returns one that takes extra args."""
  if isinstance(optimizer, optax.MultiSteps):
    optimizer = optimizer.gradient_transformation()
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError("optimizer must be an optax GradientTransformation, got "
                    f"{optimizer!r}.")
  return optax.with_extra_args_support(optimizer)


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware` (and of :func:`sam`, :func:`asam`).

  Attributes:
    opt_state: the base optimizer's state.
    perturbation_state: the perturbation transform's state (e.g. the step
      count of a ``rho`` schedule).
  """
  opt_state: optax.OptState
  perturbation_state: optax.OptState


def sharpness_aware(
    optimizer: optax.GradientTransformation,
    perturbation: optax.GradientTransformation,
    *,
    perturb: groups_lib.MaskOrFn = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Two-pass sharpness-aware minimization with any perturbation transform.

  Args:
    optimizer: the base (outer) optimizer that consumes the SAM gradient:
      any optax transformation, ``optax.chain(...)``, an
      ``optax.inject_hyperparams`` optimizer, or ``optax.MultiSteps``.
    perturbation: maps the clean gradient to the perturbation ``eps``, e.g.
      :func:`optax_sam.sam_perturbation`.
    perturb: restricts the perturbation to a static subset of leaves: a
      pytree of bools shaped like params, or ``params -> mask`` (optax's
      masking convention); None perturbs every leaf. Build one from layer
      names with ``optax_sam.layer_groups(params).mask([...])``.
    axis_name: average the descent gradient over this mapped axis
      (``jax.pmap``/``jax.shard_map``).
    sync_ascent: also average the ascent gradient over ``axis_name`` (default
      False: each device perturbs with its own shard's gradient).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``update`` takes
    ``grad_fn`` (C1) or is driven by :func:`optax_sam.make_update` (C2); any
    other keyword arguments are passed on to ``optimizer.update``.
  """
  optimizer = as_extra_args(optimizer)
  if sync_ascent and axis_name is None:
    raise ValueError("sync_ascent=True needs an axis_name.")
  if perturb is not None and not callable(perturb):
    # Validate a static mask's leaves early; structure is checked at update.
    for m in jax.tree.leaves(perturb):
      if not isinstance(m, (bool, int)) and not hasattr(m, "dtype"):
        raise TypeError(f"perturb mask leaves must be bools, got {m!r}.")

  def init_fn(params):
    return SharpnessAwareState(
        opt_state=optimizer.init(params),
        perturbation_state=perturbation.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    if params is None:
      raise ValueError("sharpness-aware updates need params: call "
                       "tx.update(grads, state, params, grad_fn=...).")
    oracle = step_lib.as_oracle(updates, grad_fn)
    mask = groups_lib.resolve_mask(perturb, params, what="perturb")
    local = step_lib.as_local(params, axis_name)
    g = oracle.clean(local, wrt=mask)
    if sync_ascent:
      g = step_lib.pmean_where(g, mask, axis_name)
    eps, perturbation_state = perturbation.update(
        g, state.perturbation_state, params)
    g_sam = oracle.perturbed(step_lib.add_where(local, eps, mask), 0)
    g_sam = step_lib.pmean_where(g_sam, None, axis_name)
    new_updates, opt_state = optimizer.update(
        g_sam, state.opt_state, params, **extra_args)
    return new_updates, SharpnessAwareState(opt_state, perturbation_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    *,
    perturb: groups_lib.MaskOrFn = None,
    per_layer: bool = False,
    labels: groups_lib.Labels = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization (SAM).

  ``eps = rho * g / ||g||`` with ``g`` the gradient at ``w``; the base
  optimizer consumes ``grad L(w + eps)`` at ``w``. Two gradient passes per
  step; with ``perturb`` restricted to some layers the clean pass covers only
  those layers (C2 compiles it to less work).

  Example (C2)::

    tx = optax_sam.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))
    (loss, _), updates, opt_state = step(params, tx.init(params), x, y)

  Args:
    optimizer: the base optimizer (see :func:`sharpness_aware`).
    rho: neighbourhood radius, a finite number > 0, or a schedule of the
      step count (a step where it returns NaN, inf or a negative value is
      not perturbed: see :func:`optax_sam.scale_by_rho`). The paper's
      default for CIFAR with SGD is 0.05.
    perturb: static subset of leaves to perturb (mask or ``params -> mask``).
    per_layer: normalize the ascent per layer group instead of globally.
    labels: layer labels for ``per_layer`` (default: parent path).
    axis_name: mapped axis to average the descent gradient over.
    sync_ascent: also average the ascent gradient (default: m-sharpness).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return sharpness_aware(
      optimizer,
      perturb_lib.sam_perturbation(rho, per_layer=per_layer, labels=labels),
      perturb=perturb, axis_name=axis_name, sync_ascent=sync_ascent)


class PlainState(NamedTuple):
  """State of :func:`plain`: the base optimizer's state."""
  opt_state: optax.OptState


def plain(
    optimizer: optax.GradientTransformation,
    *,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """The base optimizer with one gradient pass and no perturbation.

  The baseline (e.g. SGD) in the same harness as the sharpness-aware
  methods: usable with :func:`optax_sam.make_update` (C2) and, in C1, with or
  without ``grad_fn`` (it is not called).

  Args:
    optimizer: any optax transformation.
    axis_name: average the gradient over this mapped axis.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  optimizer = as_extra_args(optimizer)

  def init_fn(params):
    return PlainState(optimizer.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    if isinstance(grad_fn, step_lib.GradientOracle):
      if params is None:
        raise ValueError("make_update needs params.")
      updates = grad_fn.clean(step_lib.as_local(params, axis_name))
    elif updates is None:
      raise ValueError("updates is None: pass the gradient.")
    updates = step_lib.pmean_where(updates, None, axis_name)
    updates, opt_state = optimizer.update(updates, state.opt_state, params,
                                          **extra_args)
    return updates, PlainState(opt_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
