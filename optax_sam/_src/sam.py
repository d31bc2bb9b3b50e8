"""Vanilla SAM, and the one-pass baseline :func:`plain`.

:func:`sam` is :func:`optax_sam.sharpness_aware` (``engine.py``) with SAM's
perturbation ``rho g / ||g||``:

1. clean pass: ``g = grad L(w)`` (for the perturbed leaves only);
2. ascent: ``eps = rho g / ||g||``; ``w_adv = w + eps`` on those leaves;
3. descent pass: ``g_sam = grad L(w_adv)`` for every leaf;
4. ``updates = optimizer.update(g_sam, opt_state, w)``.

:func:`plain` is the base optimizer with one pass and no perturbation, so
SGD runs through the same harness as every method.

Data parallelism (``axis_name``): the descent gradient is averaged over the
axis; the ascent gradient stays local to each device (m-sharpness, as in the
SAM authors' code) unless ``sync_ascent=True``. In C1 pass the *local*
gradient and a *local* ``grad_fn``; the transformation averages what must be
averaged.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import batching as batching_lib
from optax_sam._src import engine
from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import policies as policies_lib
from optax_sam._src import schedules as schedules_lib
from optax_sam._src import step as step_lib

as_extra_args = engine.as_extra_args


def sam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    *,
    mask: groups_lib.MaskOrFn = None,
    per_layer: bool = False,
    labels: groups_lib.Labels = None,
    policy: Optional[policies_lib.Policy] = None,
    schedule: Optional[schedules_lib.ReuseSchedule] = None,
    mixer: Optional[schedules_lib.Mixer] = None,
    unselected: Optional[str] = None,
    alpha: float = 1.0,
    executor: Union[str, executors_lib.Executor, None] = "auto",
    order: Any = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
    perturb: groups_lib.MaskOrFn = None,
    m: Optional[int] = None,
    batch_argnums: Optional[tuple[int, ...]] = None,
    micro_batch_loop: str = "vmap",
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization (SAM).

  ``eps = rho * g / ||g||`` with ``g`` the gradient at ``w``; the base
  optimizer consumes ``grad L(w + eps)`` at ``w``. Two gradient passes per
  step; with ``mask`` restricting the perturbation to some layers the clean
  pass covers only those layers (C2 compiles it to less work).

  Example (C2)::

    tx = optax_sam.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))
    (loss, _), updates, opt_state = step(params, tx.init(params), x, y)

  Args:
    optimizer: the base optimizer (any optax transformation, chain,
      ``inject_hyperparams`` optimizer or ``optax.MultiSteps``).
    rho: neighbourhood radius, a finite number > 0, or a schedule of the
      step count (a step where it returns NaN, inf or a negative value is
      not perturbed: see :func:`optax_sam.perturbations.scale_by_rho`). The
      paper's default for CIFAR with SGD is 0.05.
    mask: static subset of leaves to perturb (pytree of bools or
      ``params -> mask``, e.g. ``optax_sam.layer_groups(p).mask([...])``).
    per_layer: normalize the ascent per layer group instead of globally.
    labels: layer labels for ``per_layer`` (default: parent path).
    policy: a run-time layer policy (:mod:`optax_sam.policies`); see
      :func:`optax_sam.sharpness_aware`.
    schedule: when to run the ascent (:mod:`optax_sam.schedules`); default
      every step.
    mixer: what the skipped steps descend along (default with a schedule:
      ARSAM's PSF mixer).
    unselected: what leaves outside the selection descend along (see
      :func:`optax_sam.sharpness_aware`; default ``"perturbed"``, SAM's
      definition, or ``"clean"`` with a policy).
    alpha: the selected leaves descend along ``(1 - alpha) g + alpha
      g_adv`` (1: SAM).
    executor: see :func:`optax_sam.sharpness_aware`.
    order: group order of the policy's layers (see
      :func:`optax_sam.layer_groups`).
    axis_name: mapped axis to average the descent gradient over.
    sync_ascent: also average the ascent gradient (default: m-sharpness).
    perturb: deprecated name of ``mask``.
    m: m-sharpness on one device: the ascent (clean gradient, ``eps``,
      perturbed gradient) runs on each micro-batch of ``m`` consecutive
      examples separately, under one ``vmap``, and the descent gradients
      are averaged (``m=1``: per-example ascent). The batch size must be a
      multiple of ``m``. C2 only (C1 raises ``ValueError``); the C2 aux gets
      a leading micro-batch axis (see
      :func:`optax_sam._src.batching.per_micro_batch`). None (default): the
      whole batch, one ascent. Not with ``policy`` or ``schedule``.
    batch_argnums: with ``m``: the positional arguments of ``loss_fn``
      (after params) that hold the batch (default all).
    micro_batch_loop: with ``m``: ``"vmap"`` (the micro-batches side by
      side) or ``"map"`` (one after the other, ``lax.scan``: one copy of the
      perturbed weights at a time; faster on the CPU for small ``m``, see
      ``benchmarks/results/family_cost.json``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SharpnessAwareState`.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

    Baek, Kolter and Raghunathan, `Why is SAM Robust to Label Noise?
    <https://arxiv.org/abs/2405.03676>`_, ICLR 2024 (m-sharpness, ``m=1``).
  """
  if m is not None:
    if policy is not None or schedule is not None:
      raise ValueError("sam(m=...) (per-micro-batch ascent) does not take a "
                       "policy or a schedule.")
    return batching_lib.per_micro_batch(
        lambda base: engine.sharpness_aware(
            base,
            perturb_lib.sam_perturbation(rho, per_layer=per_layer,
                                         labels=labels),
            mask=mask, perturb=perturb, unselected=unselected, alpha=alpha,
            executor=executor, labels=labels, order=order,
            axis_name=axis_name, sync_ascent=sync_ascent),
        optimizer, m, batch_argnums=batch_argnums, loop=micro_batch_loop)
  return engine.sharpness_aware(
      optimizer,
      perturb_lib.sam_perturbation(rho, per_layer=per_layer, labels=labels),
      mask=mask, perturb=perturb, policy=policy, schedule=schedule,
      mixer=mixer, unselected=unselected, alpha=alpha, executor=executor,
      labels=labels, order=order, axis_name=axis_name,
      sync_ascent=sync_ascent)


class PlainState(NamedTuple):
  """State of :func:`plain`.

  Attributes:
    opt_state: the base optimizer's state.
    finite: bool, whether the last step's gradient and the updates the base
      optimizer produced from it were all finite (True after ``init``);
      reported only, as :attr:`optax_sam.SharpnessAwareState.finite`.
  """
  opt_state: optax.OptState
  finite: jax.Array


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
    return PlainState(optimizer.init(params), jnp.ones([], jnp.bool_))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    if isinstance(grad_fn, step_lib.GradientOracle):
      if params is None:
        raise ValueError("make_update needs params.")
      updates = grad_fn.clean(step_lib.as_local(params, axis_name))
    elif updates is None:
      raise ValueError("updates is None: pass the gradient.")
    updates = step_lib.pmean_where(updates, None, axis_name)
    new_updates, opt_state = optimizer.update(updates, state.opt_state,
                                              params, **extra_args)
    finite = engine.all_finite(updates) & engine.all_finite(new_updates)
    return new_updates, PlainState(opt_state, finite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
