"""ARSAM: adaptively sampling, reusing and mixing SAM's decomposed gradient.

SAM's gradient decomposes into the SGD gradient ``g`` and the PSF (the
projection of the second-order gradient onto the first-order one; to first
order ``g_sam - g ~ rho H g / ||g||``). The PSF evolves slowly, so ARSAM
recomputes it only on adaptively sampled steps and, on the other steps, mixes
the last PSF into the fresh SGD gradient. Built from ``reuse.py``:
:func:`optax_sam.recompute_adaptive` (the schedule) and
:func:`optax_sam.psf_mixer` (the mixing) in :func:`optax_sam.reuse_sam`.

What could not be read from the paper here, and what decides it instead
(each exposed as a parameter): the PSF is the whole difference
``g_sam - g``, its mixing weight is ``decay**age`` for ``age <= horizon``
and 0 after (``decay=0.7``, ``horizon=6``), and the sampling rule is the
window/quota rule with trend-driven rate of the authors' predecessor vSAM
(``schedule``, see :func:`optax_sam.recompute_adaptive`), all from the
authors' public vSAM code.

References:
  Deng and Pang, `Adaptively Sampling-Reusing-Mixing Decomposed Gradients to
  Speed Up Sharpness Aware Minimization <https://arxiv.org/abs/2510.03763>`_,
  2025.
"""

from __future__ import annotations

from typing import Optional

import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import reuse as reuse_lib


def arsam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    *,
    schedule: Optional[reuse_lib.ReuseSchedule] = None,
    decay: float = 0.7,
    horizon: Optional[int] = 6,
    perturb: groups_lib.MaskOrFn = None,
    stats_on: groups_lib.MaskOrFn = None,
    seed: args_lib.SeedOrKey = 0,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """ARSAM: SAM that recomputes the PSF on adaptively sampled steps.

  On a sampled step: ``eps = rho g / ||g||``, ``g_sam = grad L(w + eps)``,
  the base optimizer consumes ``g_sam`` (two gradient passes) and
  ``psf = g_sam - g`` is stored. On the other steps it consumes
  ``g + decay**age * psf`` (one pass), ``age`` the steps since the PSF was
  computed, and plain ``g`` once ``age > horizon``. The two kinds of step
  are the branches of one ``lax.cond``, with the clean pass shared before
  it. Cost: ``1 + f`` SGD gradients per step, ``f`` the sampled fraction
  (``optax_sam.recompute_fraction(state)``).

  With ``schedule=optax_sam.recompute_always()`` (or any schedule that
  recomputes every step) this is :func:`optax_sam.sam` exactly.

  Example (C2)::

    tx = optax_sam.arsam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))
    (loss, _), updates, opt_state = step(params, tx.init(params), x, y)

  Args:
    optimizer: the base optimizer (any optax transformation).
    rho: SAM radius, > 0, or a schedule (paper: SAM's, 0.05 on CIFAR with
      SGD).
    schedule: when to recompute; default
      ``optax_sam.recompute_adaptive()`` (windows of 50 steps, a quota
      adapted to the PSF's trend, 50 warm-up steps of SAM). Also
      ``recompute_every(k)``, ``recompute_with_probability(p)``, or any
      :class:`optax_sam.ReuseSchedule`.
    decay: per-step decay of the reused PSF's weight (vSAM code: 0.7).
    horizon: reuse steps that still mix the PSF in (vSAM code: 6); None for
      no limit (with ``decay=1``: the PSF reused unchanged).
    perturb: static subset of leaves to perturb (mask or ``params -> mask``).
    stats_on: leaves whose norms drive the adaptive schedule (vSAM: the last
      few parameter tensors); default every leaf.
    seed: seed of the sampling's PRNG key (identical on every device): an
      int, a raw ``uint32`` key or a typed key.
    axis_name: mapped axis to average the gradients (and so the schedule's
      statistics) over.
    sync_ascent: also average the ascent gradient (default: m-sharpness).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`optax_sam.ReuseState`.

  References:
    Deng and Pang, `Adaptively Sampling-Reusing-Mixing Decomposed Gradients
    to Speed Up Sharpness Aware Minimization
    <https://arxiv.org/abs/2510.03763>`_, 2025.
  """
  if schedule is None:
    schedule = reuse_lib.recompute_adaptive()
  return reuse_lib.reuse_sam(
      optimizer, schedule, reuse_lib.psf_mixer(decay, horizon),
      perturbation=perturb_lib.sam_perturbation(rho), perturb=perturb,
      stats_on=stats_on, seed=seed, axis_name=axis_name,
      sync_ascent=sync_ascent)
