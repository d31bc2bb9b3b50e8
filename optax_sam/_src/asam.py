"""ASAM: adaptive (scale-invariant) sharpness-aware minimization."""

from __future__ import annotations

from typing import Optional, Union

import optax

from optax_sam._src import engine
from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import policies as policies_lib
from optax_sam._src import schedules as schedules_lib


def asam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    mask: groups_lib.MaskOrFn = None,
    adaptive_mask: Optional[groups_lib.MaskOrFn] = None,
    per_layer: bool = False,
    labels: groups_lib.Labels = None,
    policy: Optional[policies_lib.Policy] = None,
    schedule: Optional[schedules_lib.ReuseSchedule] = None,
    mixer: Optional[schedules_lib.Mixer] = None,
    unselected: Optional[str] = None,
    executor: Union[str, executors_lib.Executor, None] = "auto",
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
    perturb: groups_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """Adaptive SAM: ``eps = rho * T_w^2 g / ||T_w g||``, ``T_w = |w| + eta``.

  The ascent is measured in a parameter-scaled norm, so the sharpness it
  penalizes is invariant to rescaling weights. Defaults are the paper's for
  CIFAR with SGD (``rho=0.5``, ``eta=0.01``). Weight decay belongs to the base
  optimizer (e.g. ``optax.sgd`` chained with ``optax.add_decayed_weights``),
  which applies it at the unperturbed weights.

  ``T_w g`` is formed after dividing ``g`` by its largest magnitude (the
  normalization cancels the factor), so huge gradients (``1e30``) or
  float16 leaves do not overflow ``|w| |g|`` (see
  :func:`optax_sam.asam_perturbation`).

  Args:
    optimizer: the base optimizer (see :func:`optax_sam.sharpness_aware`).
    rho: neighbourhood radius, > 0, or a schedule.
    eta: offset in ``T_w = |w| + eta``.
    mask: static subset of leaves to perturb (mask or ``params -> mask``).
    adaptive_mask: leaves that get ``T_w`` (the others use 1); default all.
      The authors' code scales weights only, not biases.
    per_layer: normalize ``T_w g`` per layer group instead of globally.
    labels: layer labels for ``per_layer`` (and the policy's groups).
    policy: a run-time layer policy (see :func:`optax_sam.sharpness_aware`).
    schedule: when to run the ascent (default every step).
    mixer: what the skipped steps descend along.
    unselected: see :func:`optax_sam.sharpness_aware`.
    executor: see :func:`optax_sam.sharpness_aware`.
    axis_name: mapped axis to average the descent gradient over.
    sync_ascent: also average the ascent gradient (default: m-sharpness).
    perturb: deprecated name of ``mask``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  return engine.sharpness_aware(
      optimizer,
      perturb_lib.asam_perturbation(rho, eta, adaptive_mask=adaptive_mask,
                                    per_layer=per_layer, labels=labels),
      mask=mask, perturb=perturb, policy=policy, schedule=schedule,
      mixer=mixer, unselected=unselected, executor=executor, labels=labels,
      axis_name=axis_name, sync_ascent=sync_ascent)
