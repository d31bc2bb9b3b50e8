"""SL-SAM: sparse layer SAM, tensors sampled by a multi-armed bandit.

Each step a bandit draws a subset of the parameter tensors (arms), each
independently with its probability ``p_i``; only those take part in the
step: the clean pass, the ascent ``eps = rho g_S / ||g_S||`` (the norm over
the drawn tensors), the perturbed pass at ``w + eps`` and the descent. The
other tensors get no gradient: no update, and their optimizer state (momenta,
Adam moments, weight decay) stays as it was. The bandit's probabilities are
updated at the end of the step from the clean pass's gradient norms of the
drawn tensors (:func:`optax_sam.policies.bandit`), and the next step's
subset is drawn then.

The rule is the one of the authors' public code (``SLSAM`` in
``github.com/chengyif/SL-SAM``, ``llama``, ``vit`` and ``roberta`` folders),
checked line by line against a numpy port of its ``get_prob`` in the tests.
Where the code and this module differ, and why:

* defaults: the code's class has ``s = 0.5, rho = 0.05, alpha_p = 0.001``;
  its README and ViT scripts use ``s = 0.2, rho = 0.01``. The class
  defaults are taken here (``fraction=0.5, rho=0.05, eta=1e-3``); pass
  ``fraction=0.2, rho=0.01`` for the README's setting;
* the code's empty draw is repeated without bound; here at most
  ``max_draws`` times (then the most probable tensor is taken);
* optax keeps one step count shared by all tensors where PyTorch's AdamW
  keeps one per tensor: a frozen tensor's Adam bias correction follows the
  global step here (see ``freeze_unselected`` of
  :func:`optax_sam.sharpness_aware`);
* ``scale_invariant=True`` (this library's option): the code's update
  depends on the absolute gradient norms, so with small norms ``eta * l``
  is tiny and the probabilities stay near ``fraction``; the option divides
  the rewards by their maximum first.

Cost. A random subset of tensors nearly always contains one near the input,
so a menu of static subsets (the ``switch`` executor) costs nearly full SAM.
The default executor, ``"gated"`` (:func:`optax_sam.executors.gated`),
skips at run time the weight-gradient products of the tensors not drawn and
the backward pass below the lowest drawn one, inside one compiled program
(C2, :func:`optax_sam.make_update`); element-wise parameters (biases,
normalization scales) are still differentiated. With a C1 ``grad_fn`` the
caller's gradients are full, and the selection only masks them.

References:
  Cheng et al., `Sparse Layer Sharpness-Aware Minimization for Efficient
  Fine-Tuning <https://arxiv.org/abs/2602.09395>`_, 2026.

  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import engine as engine_lib
from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import policies as policies_lib


def per_leaf_label(path: tuple[str, ...]) -> str:
  """One layer group per parameter leaf: the leaf's whole key path."""
  return "/".join(path) if path else "<root>"


def slsam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    fraction: float = 0.5,
    eta: float = 1e-3,
    *,
    scale_invariant: bool = False,
    labels: groups_lib.Labels = None,
    order: Any = None,
    executor: Union[str, executors_lib.Executor, None] = "gated",
    freeze: bool = True,
    min_prob: float = 1e-8,
    max_draws: int = 32,
    seed: Optional[args_lib.SeedOrKey] = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
    budget: Optional[float] = None,
    costs: Optional[Sequence[float]] = None,
) -> optax.GradientTransformationExtraArgs:
  """SL-SAM: SAM on a bandit-sampled subset of tensors (module docstring).

  Example (C2)::

    tx = optax_sam.slsam(optax.adamw(1e-4, weight_decay=0.01), rho=0.05,
                         fraction=0.5)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))
    (loss, aux), updates, opt_state = step(params, opt_state, batch)

  Args:
    optimizer: the base optimizer (any optax transformation or chain).
    rho: SAM's radius (a float or a schedule).
    fraction: the budget ``s``: expected fraction of arms drawn per step
      (``1.0`` draws every arm every step: SAM).
    eta: the bandit's learning rate (the code's ``alpha_p``).
    scale_invariant: normalize the bandit's rewards by their maximum (this
      library's option; see :func:`optax_sam.policies.bandit`).
    labels: arms. None (default): one per parameter leaf, as the code's one
      per tensor; or layer labels as for :func:`optax_sam.layer_groups`
      (e.g. ``optax_sam.layer_groups``'s default parent-path grouping with
      ``labels=lambda path: "/".join(path[:-1])``), so that a kernel and
      its bias share an arm.
    order: arm order, input side first (see :func:`optax_sam.layer_groups`).
    executor: ``"gated"`` (default, see above; ``"dense"`` when
      ``fraction=1``, where there is nothing to skip), or any executor of
      :func:`optax_sam.sharpness_aware` (``"dense"``: the reference,
      SAM's cost).
    freeze: tensors not drawn keep their optimizer state and get no update
      (the code: no gradient, so AdamW skips them). False: they get a zero
      gradient, which momentum and weight decay still act on.
    min_prob: lower bound on the probabilities (the code's 1e-8).
    max_draws: bound on repeated draws when nothing is drawn.
    seed: PRNG seed of the draws (identical on every device).
    axis_name: average gradients over this mapped axis; the bandit then
      reads averaged norms and draws the same subset on every device.
    sync_ascent: also average the ascent gradient over ``axis_name``.
    budget: the mean modelled cost of a step in SGD steps (this library's
      option): a draw dearer than the budget plus the credit saved so far
      is trimmed to the drawn arms of largest probability per unit of cost
      that fit (see :func:`optax_sam.policies.bandit`;
      ``restrict="both"``). A random draw of half the tensors nearly always
      holds one near the input, which makes the step cost about 2 SGD
      steps. None: the paper's rule.
    costs: each arm's share of the forward pass (default: parameter
      counts; a convolution costs more per parameter at high resolution).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SharpnessAwareState`: ``policy.score`` holds the
    probabilities, ``last_selection`` the arms the last step drew,
    ``ascent_active``/``descent_active`` the fraction of parameters those
    arms hold.
  """
  if executor == "gated" and not args_lib.is_traced(fraction) and float(
      fraction) >= 1.0:
    # Every tensor drawn every step: nothing to skip, and the gated passes
    # cost 4-6% more than SAM's (slsam_cost.json); this is SAM exactly.
    executor = "dense"
  policy = policies_lib.bandit(fraction, eta, scale_invariant=scale_invariant,
                               min_prob=min_prob, max_draws=max_draws,
                               seed=seed, budget=budget, costs=costs)
  return engine_lib.sharpness_aware(
      optimizer, perturb_lib.sam_perturbation(rho), policy=policy,
      unselected="zero", executor=executor,
      labels=per_leaf_label if labels is None else labels, order=order,
      axis_name=axis_name, sync_ascent=sync_ascent,
      freeze_unselected=bool(freeze))
