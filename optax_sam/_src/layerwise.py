"""Layer-wise adaptive gradient-norm penalizing (Lee, KDD 2024).

SAM's perturbation applied to the few layers with the largest gradient
norms only. The paper's finding: penalizing the gradient norm of a few
critical layers suppresses the gradient norm of the whole model about as
well as SAM, keeps SAM's convergence rate, and costs close to SGD because the
ascent pass only needs the gradient of those layers.

Built on the engine (``engine.py``): a :func:`top_k` policy held for
``every`` steps (:func:`reselect_every`), statistics taken from the clean
gradient the step computes anyway, and an executor that makes the restricted
perturbed pass cost less in the compiled program. ``schedule=`` adds reuse:
the ascent on some steps only, the stored second-order part mixed in on the
others.

Choices made here where the paper (as far as we could read it) leaves room,
each a parameter:

* statistic: the L2 norm of each layer's gradient (``statistic="norm"``;
  ``"rms"`` divides by the square root of the layer size), taken from the
  previous step's clean gradient (at ``w``), optionally smoothed (``ema``);
* re-selection every ``every`` steps (default 100), which also lets the
  ``specialize`` executor compile a handful of programs;
* ``eps = rho * g_S / ||g_S||`` normalized globally over the selected layers,
  so ``||eps|| = rho`` as in SAM (``per_layer=True`` normalizes each layer);
* the descent gradient of the selected layers is
  ``(1 - alpha) g + alpha g_adv`` (``alpha=1``, the default, is SAM's);
  the other layers take the clean gradient ``g`` (``unselected="clean"``,
  the paper's penalty form: the penalty ``||g_S||`` is differentiated
  through the selected layers only). ``unselected="perturbed"`` gives them
  the gradient at the perturbed point instead, which is also the first-order
  gradient of the penalty with respect to them (its cross terms); the
  library's first version did that. Both cost one full and one restricted
  pass per step; ``benchmarks/results/`` holds both's accuracy.

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
from optax_sam._src import sam as sam_lib
from optax_sam._src import schedules as schedules_lib


def layerwise_policy(
    num_layers: int = 2,
    every: Any = None,
    *,
    statistic: str = "norm",
    ema: float = 0.0,
    initial: Optional[Sequence[Union[int, bool]]] = None,
    interval: Any = None,
    budget: Optional[float] = None,
    costs: Optional[Sequence[float]] = None,
) -> policies_lib.Policy:
  """The selection rule of :func:`layerwise_sam`: the top ``num_layers``
  groups (within ``budget``, see :func:`optax_sam.policies.top_k`),
  re-selected every ``every`` steps (``interval``: deprecated)."""
  every = args_lib.renamed(every, interval, "every", "interval", 100)
  num_layers = args_lib.check_int(num_layers, "num_layers", 1)
  every = args_lib.check_int(every, "every", 1)
  return policies_lib.reselect_every(
      policies_lib.top_k(num_layers, statistic=statistic, ema=ema,
                         initial=initial, budget=budget, costs=costs), every)


def layerwise_sam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    num_layers: int = 2,
    *,
    every: Any = None,
    statistic: str = "norm",
    ema: float = 0.0,
    initial: Optional[Sequence[Union[int, bool]]] = None,
    alpha: float = 1.0,
    per_layer: bool = False,
    unselected: str = "clean",
    schedule: Optional[schedules_lib.ReuseSchedule] = None,
    mixer: Optional[schedules_lib.Mixer] = None,
    executor: Union[str, executors_lib.Executor, None] = "auto",
    labels: groups_lib.Labels = None,
    order: Any = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
    interval: Any = None,
    budget: Optional[float] = None,
    costs: Optional[Sequence[float]] = None,
) -> optax.GradientTransformationExtraArgs:
  """SAM on the ``num_layers`` layers with the largest gradient norms.

  With ``budget=1.25`` the selection is cost-aware: at most ``num_layers``
  layers whose modelled step cost stays within 1.25 SGD steps, chosen by
  gradient norm per unit of cost (:func:`optax_sam.policies.top_k`,
  :func:`optax_sam.policies.selection_cost`).

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
    every: re-select the layers every ``every`` steps (default 100).
    statistic: ``"norm"``, ``"sq_norm"`` or ``"rms"`` (see
      :func:`optax_sam.policies.top_k`).
    ema: smoothing of the statistic between steps (0: last step only).
    initial: layers perturbed before any statistic exists (default: the
      last ``num_layers`` groups, output side).
    alpha: weight of the perturbed gradient on the selected layers (1: SAM).
    per_layer: normalize the perturbation per layer instead of globally.
    unselected: what the other layers descend along: ``"clean"`` (the
      paper's form, default), ``"perturbed"`` (the gradient at ``w + eps``,
      this library's first version) or ``"zero"``.
    schedule: run the ascent only on the steps this
      :mod:`optax_sam.schedules` schedule picks, e.g.
      ``recompute_every(4)``; default every step.
    mixer: what the other steps descend along; default with a schedule:
      ARSAM's PSF mixer, ``g + 0.7**age * (g_sam - g)``.
    executor: how the run-time decisions become less work: ``"auto"``
      (default: ``"switch"``, one program fully inside ``jit``, or
      ``"dense"`` where its branches would be slow, see
      :func:`optax_sam.executors.auto`), ``"switch"``, ``"specialize"`` (one
      program per selection, driven by
      ``optax_sam.SpecializedStep(tx, loss_fn)``; the exact cost of a static
      subset) or ``"dense"`` (reference, no saving).
    labels: layer labels (see :func:`optax_sam.layer_groups`); e.g. group a
      ResNet by residual block.
    order: group order, input side first (see :func:`optax_sam.layer_groups`).
    axis_name: mapped axis to average the descent gradient over.
    sync_ascent: also average the ascent gradient over ``axis_name``.
    interval: deprecated name of ``every``.
    budget: the largest modelled cost of a recompute step, in SGD steps
      (> 1); None: no limit (the top ``num_layers`` by norm, whatever they
      cost).
    costs: each group's share of the forward pass (default: parameter
      counts), for ``budget``.

  Huge gradients: the layer statistic is built on a squared norm in
  float32, which overflows for a layer whose gradient norm exceeds about
  ``1e19`` (e.g. ``1e30`` gradients). Such a statistic is not a
  measurement: the layer counts as unobserved that step, its score keeps
  its last value (NaN for a layer never observed, which ranks lowest) and
  the selection holds; the step itself stays finite and is reported in
  ``state.finite`` only if its gradient or updates are not.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SharpnessAwareState` (selection, branch counts and
    active parameter ratios are in the state for logging).

  References:
    Lee, `Layer-wise Adaptive Gradient Norm Penalizing Method for Efficient
    and Accurate Deep Learning <https://arxiv.org/abs/2503.14205>`_, KDD
    2024.
  """
  every = args_lib.renamed(every, interval, "every", "interval", 100)
  if budget is not None and unselected == "perturbed":
    raise ValueError("budget models the perturbed pass restricted to the "
                     "selection; it needs unselected='clean' or 'zero'.")
  policy = layerwise_policy(num_layers, every, statistic=statistic,
                            ema=ema, initial=initial, budget=budget,
                            costs=costs)
  return sam_lib.sam(
      optimizer, rho, per_layer=per_layer, labels=labels, policy=policy,
      schedule=schedule, mixer=mixer, unselected=unselected, alpha=alpha,
      executor=executor, order=order, axis_name=axis_name,
      sync_ascent=sync_ascent)


lagnp = layerwise_sam
