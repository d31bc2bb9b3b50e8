"""Friendly-SAM (F-SAM): the ascent along the gradient's stochastic part.

F-SAM removes from the ascent direction an estimate of the full-batch
gradient, an exponential moving average of past minibatch gradients, so
that the perturbation follows the batch-specific gradient noise only:

  ``d_t = g_t - sigma m_{t-1}``,  ``eps = rho d_t / ||d_t||``,
  ``m_t = lmbda m_{t-1} + (1 - lmbda) g_t``  (``m_0 = g_0``),

then the base optimizer consumes ``grad L(w + eps)`` at ``w``, as SAM.

This is the authors' code (``FriendlySAM.first_step`` in
``github.com/nblt/F-SAM/utils.py``), followed where the paper writes it
differently: the subtracted average is the one *before* this step's
gradient enters it, and the first step initialises it to ``g_0`` and
perturbs along ``g_0`` (SAM's step). Defaults are the code's class defaults
(``rho=0.05, sigma=1, lmbda=0.9``); its CIFAR script uses ``rho=0.2,
lmbda=0.6`` and its ``train.py`` default ``lmbda=0.95``. ``sigma=0`` is SAM.

This module is :func:`optax_sam.sharpness_aware` with
:func:`friendly_perturbation` (a perturbation transform with a state: the
moving average, one parameter-shaped buffer). Two passes per step, as SAM.

References:
  Li et al., `Friendly Sharpness-Aware Minimization
  <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

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


class FriendlyPerturbationState(NamedTuple):
  """State of :func:`friendly_perturbation`.

  Attributes:
    average: ``m``, the moving average of the clean gradients.
    count: int32, steps seen (``m`` is set to ``g`` at the first).
    radius: the state of the ``rho`` scaling.
  """
  average: PyTree
  count: jax.Array
  radius: optax.OptState


def friendly_perturbation(rho: perturb_lib.ScalarOrSchedule = 0.05,
                          sigma: float = 1.0, lmbda: float = 0.9, *,
                          axis_name: Optional[str] = None
                          ) -> optax.GradientTransformation:
  """F-SAM's ascent: ``rho d / ||d||``, ``d = g - sigma m`` (module
  docstring), updating the moving average ``m``.

  With ``axis_name`` the average is of the gradients averaged over that
  axis (so it is the same on every device, as the authors' DDP runs
  average gradients before it), while ``d`` subtracts it from each
  device's own gradient."""
  sigma = args_lib.check_number(sigma, "sigma", 0.0)
  lmbda = args_lib.check_number(lmbda, "lmbda", 0.0, 1.0)
  scale = perturb_lib.sam_perturbation(rho)

  def init_fn(params):
    return FriendlyPerturbationState(
        jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.int32),
        scale.init(params))

  def update_fn(updates, state, params=None):
    first = state.count == 0
    d = jax.tree.map(
        lambda g, m: (_f32(g) - sigma * _f32(m)).astype(g.dtype), updates,
        state.average)
    g_avg = (updates if axis_name is None
             else jax.lax.pmean(updates, axis_name))
    avg = jax.tree.map(
        lambda g, m: jnp.where(first, _f32(g), lmbda * _f32(m) + (
            1 - lmbda) * _f32(g)).astype(m.dtype), g_avg, state.average)
    eps, radius = scale.update(d, state.radius, params)
    return eps, FriendlyPerturbationState(
        avg, optax.safe_increment(state.count), radius)

  return optax.GradientTransformation(init_fn, update_fn)


def fsam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    *,
    executor: Union[str, executors_lib.Executor, None] = "auto",
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Friendly-SAM (module docstring).

  Example (C2)::

    tx = optax_sam.fsam(optax.sgd(0.05, momentum=0.9), rho=0.2, lmbda=0.6)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))

  Args:
    optimizer: the base optimizer.
    rho: the radius, > 0, or a schedule.
    sigma: weight of the subtracted average, >= 0 (0: SAM).
    lmbda: the moving average's decay, in ``[0, 1]``.
    executor: see :func:`optax_sam.sharpness_aware`.
    axis_name: mapped axis to average the descent gradient over.
    sync_ascent: also average the ascent gradient. Either way the moving
      average is of the averaged gradients (the same on every device).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SharpnessAwareState` (``perturbation_state.average``
    holds ``m``).

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
  """
  return engine.sharpness_aware(
      optimizer,
      friendly_perturbation(rho, sigma, lmbda,
                            axis_name=axis_name if not sync_ascent else None),
      executor=executor,
      axis_name=axis_name, sync_ascent=sync_ascent)
