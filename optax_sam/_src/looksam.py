"""LookSAM: SAM's ascent every ``k`` steps, its orthogonal part reused.

Every ``k`` steps LookSAM computes both ``g`` and ``g_sam`` and keeps
``g_v``, the component of ``g_sam`` orthogonal to ``g``; on the other steps
it computes only ``g`` and descends along ``g + alpha ||g|| / ||g_v|| g_v``.
It is :func:`optax_sam.reuse_sam` with :func:`optax_sam.recompute_every` and
:func:`optax_sam.orthogonal_mixer`.

References:
  Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
  <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
"""

from __future__ import annotations

from typing import Optional

import optax

from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import reuse as reuse_lib


def looksam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    *,
    per_layer: bool = False,
    labels: groups_lib.Labels = None,
    perturb: groups_lib.MaskOrFn = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """LookSAM: recompute SAM's gradient every ``k`` steps, reuse ``g_v``.

  Steps ``0, k, 2k, ...`` run two gradient passes, descend along ``g_sam``
  and store ``g_v = g_sam - <g_sam, u> u`` (``u = g / ||g||``); the others
  run one pass and descend along ``g + alpha * ||g|| / ||g_v|| * g_v``.
  Cost: ``1 + 1/k`` SGD gradients per step. ``k=1`` is :func:`optax_sam.sam`
  exactly.

  Example (C2)::

    tx = optax_sam.looksam(optax.adamw(1e-3), rho=0.05, k=5, alpha=0.7)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))

  Args:
    optimizer: the base optimizer (any optax transformation).
    rho: SAM radius, > 0, or a schedule.
    k: recompute interval, an integer >= 1 (paper: 5).
    alpha: weight of the reused component, >= 0 (paper: 0.7).
    per_layer: project and rescale ``g_v`` per layer group instead of over
      all leaves. The paper's Algorithm 1 writes ``g``, ``g_s`` and ``g_v``
      as single vectors over all parameters: that is the default here. No
      official LookSAM code was released; the per-group variant (per
      parameter tensor with ``labels=lambda path: "/".join(path)``) is a
      choice of this library, not the paper's, made so that each layer's
      reused component is scaled by that layer's own gradient norm. This is
      not Look-LayerSAM's layer-wise perturbation.
    labels: layer labels for ``per_layer`` (default: parent path).
    perturb: static subset of leaves to perturb (mask or ``params -> mask``).
    axis_name: mapped axis to average the gradients over.
    sync_ascent: also average the ascent gradient (default: m-sharpness).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`optax_sam.ReuseState`.

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  return reuse_lib.reuse_sam(
      optimizer, reuse_lib.recompute_every(k),
      reuse_lib.orthogonal_mixer(alpha, per_layer=per_layer, labels=labels),
      perturbation=perturb_lib.sam_perturbation(rho), perturb=perturb,
      axis_name=axis_name, sync_ascent=sync_ascent)
