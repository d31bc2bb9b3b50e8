"""MSAM: Momentum-SAM, the perturbation along the negative momentum.

MSAM perturbs the parameters along the negative normalized momentum of the
descent gradients, ``eps = -rho m / ||m||``, and takes its one gradient pass
at ``w + eps``:

  ``g_t = grad L(w_t - rho m_t / ||m_t||)``, ``m_{t+1} = mu m_t + g_t``,

and the base optimizer consumes ``g_t`` at ``w_t``. No pass at ``w``: one
gradient per step, SGD's cost. ``m`` is zero at the start, so the first step
is the base optimizer's step exactly.

This module is :func:`optax_sam.sharpness_aware` with
:func:`momentum_perturbation` and the engine's one-pass hooks
(``clean_pass=False``; ``observe``, which adds each step's descent gradient
to the momentum). The momentum is MSAM's own copy, kept in
``state.perturbation_state`` (one parameter-shaped buffer): with
``optax.sgd(lr, momentum=mu)`` as the base optimizer it equals the base
optimizer's trace (both are ``m = mu m + g`` of the same gradients). The
authors' code reads the SGD buffer itself, which includes the weight-decay
term (their SGD adds ``wd * w`` to the gradient first); with a separate
``optax.add_decayed_weights`` in a chain, this copy does not see it.

In C1 the gradient passed to ``update`` (at ``w``) is not used: MSAM's one
gradient is ``grad_fn(w + eps, 0)``; C2 runs only that pass.

As the paper, the loss and aux that C2 returns are those of the one pass,
at ``w + eps`` (not at ``w``): BatchNorm statistics come from the perturbed
weights.

Defaults: ``rho=0.3`` (the authors' ``MSAM`` class; their CIFAR-100
WideResNet config uses ``rho=3`` with a learning rate of 0.5), ``mu=0.9``.

References:
  Becker, Altrock and Risse, `Momentum-SAM: Sharpness Aware Minimization
  without Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import engine
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib

PyTree = Any
_f32 = groups_lib.f32


class MomentumPerturbationState(NamedTuple):
  """State of :func:`momentum_perturbation`.

  Attributes:
    momentum: ``m``, the momentum of the descent gradients (params-shaped).
    radius: the state of the ``rho`` scaling (a schedule's step count).
  """
  momentum: PyTree
  radius: optax.OptState


def momentum_perturbation(rho: perturb_lib.ScalarOrSchedule = 0.3,
                          mu: float = 0.9) -> optax.GradientTransformation:
  """``eps = -rho m / ||m||`` from the state's momentum (the input ignored).

  ``eps = 0`` while ``m = 0``. Use with the engine's ``clean_pass=False``
  and :func:`momentum_observer` (``m = mu m + descent``).
  """
  mu = args_lib.check_number(mu, "mu", 0.0, 1.0)
  scale = perturb_lib.sam_perturbation(rho)

  def init_fn(params):
    return MomentumPerturbationState(
        jax.tree.map(jnp.zeros_like, params), scale.init(params))

  def update_fn(updates, state, params=None):
    del updates  # eps comes from the momentum alone
    eps, radius = scale.update(state.momentum, state.radius, params)
    return (jax.tree.map(jnp.negative, eps),
            MomentumPerturbationState(state.momentum, radius))

  return optax.GradientTransformation(init_fn, update_fn)


def momentum_observer(mu: float = 0.9) -> engine.ObserveFn:
  """``observe`` for the engine: ``m = mu m + descent``."""
  mu = args_lib.check_number(mu, "mu", 0.0, 1.0)

  def observe(state, descent):
    m = jax.tree.map(lambda a, g: (mu * _f32(a) + _f32(g)).astype(a.dtype),
                     state.momentum, descent)
    return state._replace(momentum=m)

  return observe


def msam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.3,
    mu: float = 0.9,
    *,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """MSAM: one gradient pass at ``w - rho m / ||m||`` (module docstring).

  Example (C2)::

    tx = optax_sam.msam(optax.sgd(0.1, momentum=0.9), rho=0.3, mu=0.9)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))
    (loss_at_w_adv, aux), updates, opt_state = step(params, opt_state, x, y)

  Args:
    optimizer: the base optimizer (MSAM is written for SGD with momentum
      ``mu``; any optax optimizer works).
    rho: the radius, > 0, or a schedule.
    mu: the momentum of MSAM's own copy, in ``[0, 1]`` (the base SGD's).
    axis_name: mapped axis to average the gradient over (the momentum is
      then the same on every device).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SharpnessAwareState` (``perturbation_state.momentum``
    holds ``m``; ``clean_active`` is 0).

  References:
    Becker, Altrock and Risse, `Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead <https://arxiv.org/abs/2401.12033>`_,
    2024.
  """
  return engine.sharpness_aware(
      optimizer, momentum_perturbation(rho, mu), clean_pass=False,
      observe=momentum_observer(mu), axis_name=axis_name)
