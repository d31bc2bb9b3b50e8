"""Layer-wise adaptive gradient-norm penalizing (Lee, KDD 2024).

SAM's perturbation applied to the few layers with the largest gradient
norms only. The paper's finding: penalizing the gradient norm of a few
critical layers suppresses the gradient norm of the whole model about as
well as SAM, keeps SAM's convergence rate, and costs close to SGD because the
ascent pass only needs the gradient of those layers.

Built on the selection engine (``selective.py``): a :func:`top_k` policy held
for ``interval`` steps (:func:`reselect_every`), statistics taken from the
descent gradient the step computes anyway, and an executor that makes the
restricted ascent pass cost less in the compiled program.

Choices made here where the paper (as far as we could read it) leaves room,
each a parameter:

* statistic: the L2 norm of each layer's gradient (``statistic="norm"``;
  ``"rms"`` divides by the square root of the layer size), taken from the
  previous step's *descent* gradient (at ``w + eps``), optionally smoothed
  (``ema``);
* re-selection every ``interval`` steps (default 100), which also lets the
  ``specialize`` executor compile a handful of programs;
* ``eps = rho * g_S / ||g_S||`` normalized globally over the selected layers,
  so ``||eps|| = rho`` as in SAM (``per_layer=True`` normalizes each layer);
* the descent gradient of the selected layers is
  ``(1 - alpha) g + alpha g_adv`` (``alpha=1``, the default, is SAM's);
  other layers take the gradient at the perturbed point.

With ``num_layers`` equal to the number of layer groups this is SAM exactly.

References:
  Lee, `Layer-wise Adaptive Gradient Norm Penalizing Method for Efficient and
  Accurate Deep Learning <https://arxiv.org/abs/2503.14205>`_, KDD 2024.

  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import policies as policies_lib
from optax_sam._src import selective as selective_lib


def layerwise_policy(
    num_layers: int = 2,
    interval: int = 100,
    *,
    statistic: str = "norm",
    ema: float = 0.0,
    initial: Optional[Sequence[Union[int, bool]]] = None,
) -> policies_lib.Policy:
  """The selection rule of :func:`layerwise_sam` (top-k, held ``interval``).

  Pass it to :class:`optax_sam.SpecializedStep` so the loop reads the
  selection from the device only at re-selection steps.
  """
  num_layers = args_lib.check_int(num_layers, "num_layers", 1)
  interval = args_lib.check_int(interval, "interval", 1)
  return policies_lib.reselect_every(
      policies_lib.top_k(num_layers, statistic=statistic, ema=ema,
                         initial=initial), interval)


def layerwise_sam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    num_layers: int = 2,
    *,
    interval: int = 100,
    statistic: str = "norm",
    ema: float = 0.0,
    initial: Optional[Sequence[Union[int, bool]]] = None,
    alpha: float = 1.0,
    per_layer: bool = False,
    executor: Union[str, executors_lib.Executor, None] = "switch",
    labels: groups_lib.Labels = None,
    order: Any = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SAM on the ``num_layers`` layers with the largest gradient norms.

  Example (C2)::

    tx = optax_sam.layerwise_sam(optax.sgd(0.1, momentum=0.9), rho=0.05,
                                 num_layers=2)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))
    (loss, _), updates, opt_state = step(params, tx.init(params), x, y)
    opt_state.policy.selection   # layers perturbed at the next step

  Args:
    optimizer: the base optimizer (SGD with momentum, AdamW, any chain).
    rho: SAM radius (> 0) or a schedule of the step count.
    num_layers: how many layer groups are perturbed (``k``).
    interval: re-select the layers every ``interval`` steps.
    statistic: ``"norm"``, ``"sq_norm"`` or ``"rms"`` (see
      :func:`optax_sam.top_k`).
    ema: smoothing of the statistic between steps (0: last step only).
    initial: layers perturbed before any statistic exists (default: the
      last ``num_layers`` groups, output side).
    alpha: weight of the perturbed gradient on the selected layers (1: SAM).
    per_layer: normalize the perturbation per layer instead of globally.
    executor: how the run-time selection becomes less work: ``"switch"``
      (default; one program, fully inside ``jit``; on the CPU, drive it with
      :func:`optax_sam.make_update`, whose forward-form convolution backward
      keeps conv nets fast inside its branches), ``"specialize"`` (one
      program per selection, driven by
      ``optax_sam.SpecializedStep(tx, loss_fn)``; the exact cost of a static
      subset) or ``"dense"`` (reference, no saving).
    labels: layer labels (see :func:`optax_sam.layer_groups`); e.g. group a
      ResNet by residual block.
    order: group order, input side first (see :func:`optax_sam.layer_groups`).
    axis_name: mapped axis to average the descent gradient over.
    sync_ascent: also average the ascent gradient over ``axis_name``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SelectiveState` (selection, branch counts and active
    parameter ratios are in the state for logging).
  """
  policy = layerwise_policy(num_layers, interval, statistic=statistic,
                            ema=ema, initial=initial)
  return selective_lib.selective_sam(
      optimizer, policy,
      perturbation=perturb_lib.sam_perturbation(rho, per_layer=per_layer,
                                                labels=labels),
      executor=executor, restrict_descent=False, alpha=alpha, labels=labels,
      order=order, axis_name=axis_name, sync_ascent=sync_ascent)


lagnp = layerwise_sam
