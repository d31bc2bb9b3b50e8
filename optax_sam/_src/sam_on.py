"""SAM-ON: SAM with only the normalization layers' affine parameters perturbed.

SAM-ON ("SAM, Only Normalization") perturbs the scale and bias of the
normalization layers (BatchNorm, LayerNorm, GroupNorm, ...) and nothing
else; every parameter then descends along the gradient at the perturbed
point, as in SAM:

  ``eps = rho g_N / ||g_N||`` on the normalization leaves ``N`` (0 on the
  others), the base optimizer consuming ``grad L(w + eps)`` for every leaf.

It is :func:`optax_sam.sam` with a static ``mask`` by parameter kind,
:func:`norm_mask`. In C2 (:func:`optax_sam.make_update`) the clean pass
differentiates the normalization leaves only, so it skips the weight-gradient
products of every dense and convolution kernel (it still runs the backward
pass through the activations); the pass at ``w + eps`` is full.

The paper finds the radius can be larger than SAM's for the same model
(it tunes ``rho`` per setting); the default here is SAM's 0.05. The paper's
best results use the per-layer normalization of ASAM-type variants too
(``per_layer=True`` normalizes per layer group).

References:
  Mueller et al., `Normalization Layers Are All That Sharpness-Aware
  Minimization Needs <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Optional, Union

import jax
import optax

from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import sam as sam_lib

PyTree = Any

# A module name is a normalization layer's when one of its tokens (split at
# "_", "-", ".", digits) is one of these, or it contains "norm".
NORM_TOKENS = ("bn", "ln", "gn", "norm", "batchnorm", "layernorm",
               "groupnorm", "rmsnorm", "instancenorm")
AFFINE_NAMES = ("scale", "bias", "offset", "gamma", "beta", "weight")


def is_norm_path(path: tuple[str, ...]) -> bool:
  """Default rule: a leaf named like an affine parameter (``scale``,
  ``bias``, ``offset``, ``gamma``, ``beta``, ``weight``) under a module
  whose name says normalization (``BatchNorm_0``, ``LayerNorm_1``,
  ``a_ln``, ``bn1``, ``GroupNorm``, ``layer_norm``...)."""
  if len(path) < 2 or path[-1].lower() not in AFFINE_NAMES:
    return False
  for name in path[:-1]:
    low = name.lower()
    if "norm" in low:
      return True
    tokens = [t for t in re.split(r"[_\-.\d]+", low) if t]
    if any(t in NORM_TOKENS for t in tokens):
      return True
  return False


def norm_mask(params: PyTree,
              is_norm: Optional[Callable[[tuple[str, ...]], bool]] = None
              ) -> PyTree:
  """Bool pytree shaped like ``params``: True on normalization parameters.

  Args:
    params: the parameters.
    is_norm: ``path -> bool`` on a leaf's key path as strings (default
      :func:`is_norm_path`).

  Raises:
    ValueError: when no leaf is a normalization parameter.
  """
  rule = is_norm or is_norm_path
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: bool(rule(groups_lib.path_names(path))), params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(
        "SAM-ON found no normalization parameters (a leaf named scale/bias/"
        "... under a BatchNorm/LayerNorm/GroupNorm-like module); pass "
        "is_norm=lambda path: ... to say which leaves are.")
  return mask


def sam_on(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    *,
    is_norm: Optional[Callable[[tuple[str, ...]], bool]] = None,
    per_layer: bool = False,
    labels: groups_lib.Labels = None,
    executor: Union[str, executors_lib.Executor, None] = "auto",
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SAM-ON: SAM perturbing normalization parameters only (module docstring).

  Example (C2)::

    tx = optax_sam.sam_on(optax.sgd(0.1, momentum=0.9), rho=0.5)
    step = jax.jit(optax_sam.make_update(tx, loss_fn, has_aux=True))

  Args:
    optimizer: the base optimizer.
    rho: the radius, > 0, or a schedule.
    is_norm: ``path -> bool`` selecting the perturbed leaves (default
      :func:`is_norm_path`).
    per_layer: normalize the perturbation per layer group.
    labels: layer labels for ``per_layer``.
    executor: see :func:`optax_sam.sharpness_aware`.
    axis_name: mapped axis to average the descent gradient over.
    sync_ascent: also average the ascent gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SharpnessAwareState`.

  References:
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware
    Minimization Needs <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023.
  """
  return sam_lib.sam(
      optimizer, rho, mask=lambda params: norm_mask(params, is_norm),
      per_layer=per_layer, labels=labels, unselected="perturbed",
      executor=executor, axis_name=axis_name, sync_ascent=sync_ascent)
