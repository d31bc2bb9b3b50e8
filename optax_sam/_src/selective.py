"""Layer-selective sharpness-aware minimization: the selection engine.

:func:`selective_sam` composes three parts that live in their own modules:

* a *policy* (``policies.py``) that chooses, inside the jitted step, which
  layer groups take part (``top_k``, ``bandit``, ``fixed``, ...);
* an *executor* (``executors.py``) that turns the run-time choice into less
  computation (``switch``: a menu of static subsets under ``lax.switch``;
  ``specialize``: one compiled program per subset; ``dense``: the masked
  reference);
* a *perturbation* (``perturb.py``), SAM's by default.

One step, for the selection ``S`` the policy chose at the end of the last
step:

1. clean pass at ``w``, differentiated only for the executor's static
   superset of ``S``; the gradient is masked to ``S``;
2. ascent ``eps = perturbation(g_S)``; ``w_adv = w + eps`` on ``S``;
3. descent pass at ``w_adv``: every layer (``restrict_descent=False``, the
   layer-wise adaptive method) or only ``S`` (``restrict_descent=True``,
   SL-SAM: unselected layers get a zero gradient this step);
4. per-layer squared norms of the (averaged) descent gradient are the
   policy's statistics: selection costs no extra pass;
5. the policy picks the next step's ``S``; the base optimizer consumes the
   descent gradient.

The result equals the dense reference (full gradients, masked to ``S``) for
the same selection sequence, whatever the executor; only the work differs.
The state records the selection, the branch taken and how often each branch
ran, and the active-parameter ratio of each pass, for logging and plots.

References:
  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

  Lee, `Layer-wise Adaptive Gradient Norm Penalizing Method for Efficient and
  Accurate Deep Learning <https://arxiv.org/abs/2503.14205>`_, KDD 2024.

  Cheng et al., `Sparse Layer Sharpness-Aware Minimization for Efficient
  Fine-Tuning <https://arxiv.org/abs/2602.09395>`_, 2026.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import policies as policies_lib
from optax_sam._src import sam as sam_lib
from optax_sam._src import step as step_lib

PyTree = Any


class SelectiveState(NamedTuple):
  """State of :func:`selective_sam`.

  Attributes:
    opt_state: the base optimizer's state.
    perturbation_state: the perturbation transform's state.
    policy: the policy's state; ``policy.selection`` (bool[L], groups in
      depth order) is the selection of the *next* step.
    last_selection: bool[L], the selection the last step used.
    branch: int32, the executor branch the last step took.
    branch_counts: int32[B], how many steps took each branch.
    ascent_active: float32, fraction of parameters whose gradient the last
      step's clean (ascent) pass computed (the branch's static superset).
    descent_active: float32, the same for the descent pass.
  """
  opt_state: optax.OptState
  perturbation_state: optax.OptState
  policy: policies_lib.PolicyState
  last_selection: jax.Array
  branch: jax.Array
  branch_counts: jax.Array
  ascent_active: jax.Array
  descent_active: jax.Array


def _fraction(flags, sizes) -> float:
  total = sum(sizes)
  return sum(s for f, s in zip(flags, sizes) if f) / max(total, 1)


def selective_sam(
    optimizer: optax.GradientTransformation,
    policy: policies_lib.Policy,
    *,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    perturbation: Optional[optax.GradientTransformation] = None,
    executor: Union[str, executors_lib.Executor, None] = "switch",
    restrict_descent: bool = False,
    alpha: float = 1.0,
    labels: groups_lib.Labels = None,
    order: Any = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
    seed: Optional[args_lib.SeedOrKey] = None,
) -> optax.GradientTransformationExtraArgs:
  """SAM on a subset of layers chosen at run time by a policy.

  Example (C2)::

    policy = optax_sam.reselect_every(optax_sam.top_k(2), 100)
    tx = optax_sam.selective_sam(optax.sgd(0.1, momentum=0.9), policy)
    step = jax.jit(optax_sam.make_update(tx, loss_fn))

  Args:
    optimizer: the base optimizer (any optax transformation).
    policy: a :class:`optax_sam.Policy` (``top_k``, ``bandit``, ...).
    rho: SAM radius (> 0) or schedule; ignored when ``perturbation`` is
      given.
    perturbation: the ascent transform; default
      ``sam_perturbation(rho)`` (global normalization over the selected
      layers).
    executor: ``"switch"`` (default: one program, a ``lax.switch`` over the
      depth menu, exact cost for output-side selections, no host sync),
      ``"specialize"`` (one program per subset; drive with
      :class:`optax_sam.SpecializedStep`), ``"dense"`` (masked reference),
      or an :class:`optax_sam.Executor`.
    restrict_descent: also restrict the descent pass to the selected layers
      (SL-SAM); unselected layers then get a zero gradient for the step.
    alpha: on the selected layers the descent gradient is
      ``(1 - alpha) * g + alpha * g_adv`` (``g`` from the clean pass,
      ``g_adv`` at ``w + eps``); 1 is SAM. Other layers use ``g_adv``.
    labels: layer labels (see :func:`optax_sam.layer_groups`).
    order: group order (see :func:`optax_sam.layer_groups`); the depth menu
      assumes input side first.
    axis_name: mapped axis to average the descent gradient (and so the
      policy's statistics) over.
    sync_ascent: also average the ascent gradient (default: m-sharpness).
    seed: PRNG seed of the policy (identical on every device): an int, a raw
      ``uint32`` key or a typed key. The seed has one place: give it to the
      policy (``bandit(seed=...)``, ``random_k(k, seed=...)``) or here, for
      a policy built without one; given in both places and different, it
      raises ``ValueError``. Neither: seed 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SelectiveState`. With ``executor="specialize"`` its ``update``
    needs ``static_selection=`` (passed by ``SpecializedStep``).
  """
  optimizer = sam_lib.as_extra_args(optimizer)
  if perturbation is None:
    perturbation = perturb_lib.sam_perturbation(rho)
  if not isinstance(policy, policies_lib.Policy):
    raise TypeError(f"policy must be an optax_sam.Policy, got {policy!r}.")
  if seed is None:
    seed = policy.seed
  elif (policy.seed is not None
        and args_lib.same_seed(seed, policy.seed) is False):
    raise ValueError(
        f"selective_sam got seed={seed!r} and its policy was built with "
        f"seed={policy.seed!r}: give the seed in one place (the policy's "
        "seed=, or selective_sam's seed= for a policy built without one).")
  if sync_ascent and axis_name is None:
    raise ValueError("sync_ascent=True needs an axis_name.")
  ex = executors_lib.get_executor(executor)
  alpha = args_lib.check_number(alpha, "alpha", 0.0, 1.0)
  # A traced alpha (optax.inject_hyperparams) is mixed in whatever its value.
  mix = args_lib.is_traced(alpha) or alpha != 1.0

  def groups_of(params):
    return groups_lib.layer_groups(params, labels, order)

  def init_fn(params):
    groups = groups_of(params)
    num = groups.num_groups
    pstate = policy.init(num, args_lib.as_key(seed))
    return SelectiveState(
        opt_state=optimizer.init(params),
        perturbation_state=perturbation.init(params),
        policy=pstate,
        last_selection=pstate.selection,
        branch=jnp.zeros([], jnp.int32),
        branch_counts=jnp.zeros([ex.num_branches(num)], jnp.int32),
        ascent_active=jnp.zeros([], jnp.float32),
        descent_active=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, *, grad_fn=None,
                static_selection=None, **extra_args):
    if params is None:
      raise ValueError("selective_sam needs params: call tx.update(grads, "
                       "state, params, grad_fn=...).")
    oracle = step_lib.as_oracle(updates, grad_fn)
    groups = groups_of(params)
    selection = state.policy.selection
    leaf_sel = groups.leaf_selection(selection)
    local = step_lib.as_local(params, axis_name)

    def keep(tree, static_mask):
      return jax.tree.map(
          lambda g, s, m: jnp.where(s, g, jnp.zeros_like(g)) if m else g,
          tree, leaf_sel, static_mask)

    def body(flags):
      superset = groups.mask_from_flags(flags)
      value, g = oracle.clean_with_value(local, wrt=superset)
      g = keep(g, superset)
      if sync_ascent:
        g = step_lib.pmean_where(g, superset, axis_name)
      eps, pert_state = perturbation.update(g, state.perturbation_state,
                                            params)
      eps = keep(eps, superset)
      w_adv = step_lib.add_where(local, eps, superset)
      if restrict_descent:
        g_sam = keep(oracle.perturbed(w_adv, 0, wrt=superset), superset)
        descent = _fraction(flags, groups.sizes)
      else:
        g_sam = oracle.perturbed(w_adv, 0)
        descent = 1.0
      if mix:  # on the selected layers (g is 0 elsewhere)
        g_sam = jax.tree.map(
            lambda ga, gc, s, m: (jnp.where(s, (1 - alpha) * gc + alpha * ga,
                                            ga) if m else ga),
            g_sam, g, leaf_sel, superset)
      active = (jnp.float32(_fraction(flags, groups.sizes)),
                jnp.float32(descent))
      return value, g_sam, pert_state, active

    with (oracle.conditional() if ex.conditional
          else contextlib.nullcontext()):
      (value, g_sam, pert_state, active), branch = ex.run(
          selection, body, static_selection)
    oracle.record(*value)
    g_sam = step_lib.pmean_where(g_sam, None, axis_name)
    stats = policies_lib.LayerStats(
        sq_norms=groups.sq_norms(g_sam),
        observed=(selection if restrict_descent
                  else jnp.ones_like(selection)),
        sizes=jnp.asarray(groups.sizes, jnp.float32))
    pstate = policy.update(state.policy, stats)
    new_updates, opt_state = optimizer.update(g_sam, state.opt_state, params,
                                              **extra_args)
    counts = state.branch_counts.at[branch].set(
        optax.safe_increment(state.branch_counts[branch]))
    return new_updates, SelectiveState(
        opt_state, pert_state, pstate, selection, branch.astype(jnp.int32),
        counts, active[0], active[1])

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
