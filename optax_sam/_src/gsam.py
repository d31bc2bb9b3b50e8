"""GSAM: surrogate-gap guided SAM, on the one engine.

GSAM ascends as SAM (``eps = rho_t g / ||g||``) and descends along

  ``g_adv - alpha * g_perp``,  ``g_perp = g - <g, u> u``,  ``u = g_adv /
  ||g_adv||``,

the perturbed gradient minus ``alpha`` times the component of the clean
gradient ``g`` orthogonal to it: the descent on the perturbed loss, plus an
ascent of the clean loss orthogonal to it, which shrinks the surrogate gap
``f(w + eps) - f(w)`` without slowing the perturbed loss's descent. The
radius may follow the learning rate,
``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``.

This module is :func:`optax_sam.sharpness_aware` with SAM's perturbation
(with the learning-rate-tied radius of :func:`lr_tied_rho`) and the descent
combiner :func:`gsam_descent` (the engine's ``descent_fn`` hook).

Where the paper and the authors' code (``big_vision/trainers/proj/gsam/
gsam.py``) differ, the code is followed:

* the code also offers ``minimize_fp=False`` (descend along ``g + alpha
  (g_adv - <g_adv, v> v)``, ``v = g / ||g||``): here ``minimize_fp``;
* the code's radius extrapolates the line below ``rho_min`` when
  ``lr_t < lr_min`` (during a warm-up from 0) and can go negative; here it
  is clipped at 0 (a step with radius 0 is not perturbed), the one
  deviation from the code;
* with data parallelism (``axis_name``) the decomposition here is of the
  gradients averaged over devices; the code decomposes each worker's and
  averages the results;
* the defaults are the code's ImageNet ViT config
  (``configs/proj/gsam/vit_i1k_gsam_no_aug.py``): ``rho_max=0.6,
  rho_min=0.1, alpha=0.6``; ``rho_max == rho_min`` and ``alpha=0`` is SAM.

References:
  Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
  <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import engine
from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib

PyTree = Any
_f32 = groups_lib.f32


def lr_tied_rho(rho_max: float, rho_min: float,
                learning_rate: optax.ScalarOrSchedule, lr_max: float,
                lr_min: float = 0.0) -> optax.Schedule:
  """GSAM's radius schedule: linear in the learning rate, never negative.

  ``rho_t = max(0, rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max -
  lr_min))`` with ``lr_t = learning_rate(t)``; ``rho_max`` when ``lr_max ==
  lr_min`` (as the authors' code).

  Args:
    rho_max: radius at ``lr_t = lr_max``.
    rho_min: radius at ``lr_t = lr_min``.
    learning_rate: the base optimizer's learning rate: a schedule of the step
      count (the same one given to the optimizer) or a constant.
    lr_max: the schedule's largest learning rate.
    lr_min: the schedule's smallest (final) learning rate.

  Returns:
    An ``optax.Schedule`` of the step count.
  """
  rho_max = args_lib.check_number(rho_max, "rho_max", 0.0)
  rho_min = args_lib.check_number(rho_min, "rho_min", 0.0)
  lr_max = args_lib.check_number(lr_max, "lr_max")
  lr_min = args_lib.check_number(lr_min, "lr_min")
  lr = learning_rate if callable(learning_rate) else (
      lambda count: learning_rate)

  def schedule(count):
    if lr_max == lr_min:
      return jnp.asarray(rho_max, jnp.float32)
    value = rho_min + (rho_max - rho_min) * (
        jnp.asarray(lr(count), jnp.float32) - lr_min) / (lr_max - lr_min)
    return jnp.maximum(value, 0.0)

  return schedule


def gsam_descent(alpha: float = 0.6, minimize_fp: bool = True
                 ) -> engine.DescentFn:
  """GSAM's descent combiner ``(g, g_adv) -> descent`` (global vectors).

  ``minimize_fp=True``: ``g_adv - alpha (g - <g, u> u)``, ``u = g_adv /
  ||g_adv||``; False: ``g + alpha (g_adv - <g_adv, v> v)``, ``v = g /
  ||g||``. A zero ``g_adv`` (or ``g``) gives ``u = 0`` (``v = 0``).
  """
  alpha = args_lib.check_number(alpha, "alpha")

  def combine(g, g_adv):
    a, b = (g, g_adv) if minimize_fp else (g_adv, g)
    # a_perp, the component of a orthogonal to b; then b -/+ alpha a_perp.
    u_scale = perturb_lib.safe_inverse(perturb_lib.safe_norm(b))
    dot = sum(jnp.sum(_f32(x) * _f32(y)) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b))) * u_scale
    def leaf(x, y):
      perp = _f32(x) - dot * u_scale * _f32(y)
      if minimize_fp:
        return (_f32(y) - alpha * perp).astype(y.dtype)
      return (_f32(y) + alpha * perp).astype(y.dtype)
    return jax.tree.map(leaf, a, b)

  return combine


def gsam(
    optimizer: optax.GradientTransformation,
    rho_max: float = 0.6,
    rho_min: float = 0.1,
    alpha: float = 0.6,
    *,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    lr_max: Optional[float] = None,
    lr_min: float = 0.0,
    minimize_fp: bool = True,
    executor: Union[str, executors_lib.Executor, None] = "auto",
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """GSAM: SAM's ascent; descent ``g_adv - alpha g_perp`` (module docstring).

  Two gradient passes per step, as SAM.

  Example (C2), the radius tied to a warm-up cosine schedule::

    lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 500, 10_000)
    tx = optax_sam.gsam(optax.sgd(lr, momentum=0.9), rho_max=0.05,
                        rho_min=0.01, alpha=0.3, learning_rate=lr,
                        lr_max=0.1, lr_min=0.0)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))

  Args:
    optimizer: the base optimizer.
    rho_max: the radius (constant when ``learning_rate`` is None), > 0.
    rho_min: the radius at ``lr_min`` (with ``learning_rate``), >= 0.
    alpha: weight of the clean gradient's orthogonal component (>= 0; 0 is
      SAM with radius ``rho_t``).
    learning_rate: the base optimizer's learning-rate schedule (or constant),
      to tie the radius to it (:func:`lr_tied_rho`); None: ``rho_max``.
    lr_max: the schedule's peak learning rate (needed with
      ``learning_rate``).
    lr_min: the schedule's smallest learning rate.
    minimize_fp: the authors' code's switch (see the module docstring).
    executor: see :func:`optax_sam.sharpness_aware`.
    axis_name: mapped axis to average the gradients over.
    sync_ascent: also average the ascent gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SharpnessAwareState`.

  References:
    Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  if learning_rate is None:
    rho = rho_max
  else:
    if lr_max is None:
      raise ValueError("gsam(learning_rate=...) needs lr_max, the schedule's "
                       "peak learning rate (and lr_min, its smallest).")
    rho = lr_tied_rho(rho_max, rho_min, learning_rate, lr_max, lr_min)
  return engine.sharpness_aware(
      optimizer, perturb_lib.sam_perturbation(rho),
      descent_fn=gsam_descent(alpha, minimize_fp), executor=executor,
      axis_name=axis_name, sync_ascent=sync_ascent)
