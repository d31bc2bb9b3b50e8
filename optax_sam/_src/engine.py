"""The one sharpness-aware engine: which layers take part, and when.

Every method of ``optax_sam`` is :func:`sharpness_aware` with some of its four
parts filled in:

* a **perturbation** (``perturb.py``): the ascent transform, gradient ->
  ``eps`` (SAM's ``rho g / ||g||``, ASAM's, ...);
* a **layer policy** (``policies.py``): which layer groups take part in the
  ascent at run time (``top_k``, ``bandit``, ...), plus what the layers
  outside it descend along (``unselected``); None: every layer (or the
  static ``mask``);
* a **recompute schedule** with a **mixer** (``schedules.py``): on which
  steps the ascent runs, and what the descent uses on the other steps;
  default: every step (SAM);
* an **executor** (``executors.py``): turns the two run-time decisions
  (selection, recompute) into compiled work.

One step, with ``S`` the selection the policy made at the end of the last
step and ``r`` the schedule's decision:

1. clean pass ``g = grad L(w)``, over every leaf when a later part needs all
   of it (``unselected="clean"``, or a reuse step), else over the branch's
   static superset of ``S`` only. It runs inside each branch, so that XLA
   shares the forward computation of the unperturbed layers with the
   perturbed pass (it does not across a conditional's boundary: measured,
   a clean pass before the conditional made layer-wise SAM on an MLP's last
   two layers 1.50x SGD instead of 1.22x); only when every leaf is perturbed
   and a schedule can reuse does it run once, before the conditional;
2. on a recompute step: ``eps = perturbation(g_S)`` on the selected leaves,
   and the perturbed pass at ``w + eps`` over the selected leaves
   (``unselected="clean"`` or ``"zero"``) or every leaf
   (``"perturbed"``). The descent gradient of a selected leaf is
   ``(1 - alpha) g + alpha g_adv``; an unselected leaf takes ``g``
   (``"clean"``), ``g_adv`` (``"perturbed"``) or 0 (``"zero"``). The mixer
   stores its component of the result;
3. on a reuse step: the mixer's ``mix(g, stored, age)`` (one pass);
4. the policy sees per-layer squared norms (of the clean gradient with
   ``unselected="clean"``, else of the descent gradient), the schedule sees
   :class:`optax_sam.schedules.ReuseStats`, and the base optimizer consumes
   the descent gradient.

The executor compiles one branch per (menu entry, recompute/reuse) pair that
can occur, so a restricted pass costs less in the compiled program and a
reuse step costs one gradient pass; with one possible branch (no policy and a
static schedule: SAM, ASAM) there is no conditional at all. With every layer
selected and recomputing every step, every configuration is SAM.

References:
  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

  Lee, `Layer-wise Adaptive Gradient Norm Penalizing Method for Efficient and
  Accurate Deep Learning <https://arxiv.org/abs/2503.14205>`_, KDD 2024.

  Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
  <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.

  Deng and Pang, `Adaptively Sampling-Reusing-Mixing Decomposed Gradients to
  Speed Up Sharpness Aware Minimization <https://arxiv.org/abs/2510.03763>`_,
  2025.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import policies as policies_lib
from optax_sam._src import schedules as schedules_lib
from optax_sam._src import step as step_lib

PyTree = Any
UNSELECTED = ("clean", "perturbed", "zero")
# descent_fn(g, descent) -> descent; observe(perturbation_state, descent).
DescentFn = Callable[[PyTree, PyTree], PyTree]
ObserveFn = Callable[[optax.OptState, PyTree], optax.OptState]


def as_extra_args(optimizer: Any) -> optax.GradientTransformationExtraArgs:
  """Accepts a GradientTransformation, with or without extra args, or an
  ``optax.MultiSteps`` object, and returns one that takes extra args."""
  if isinstance(optimizer, optax.MultiSteps):
    optimizer = optimizer.gradient_transformation()
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError("optimizer must be an optax GradientTransformation, got "
                    f"{optimizer!r}.")
  return optax.with_extra_args_support(optimizer)


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware` and of every method built on it.

  A plain pytree of arrays (checkpointable, resumable bit-for-bit).

  Attributes:
    opt_state: the base optimizer's state.
    perturbation_state: the perturbation transform's state (advanced every
      step, so a ``rho`` schedule follows the step count).
    policy: the policy's state (``policy.selection``, bool[L], is the
      selection of the *next* step), or ``()`` without a policy.
    schedule: the schedule's state (holds its PRNG key).
    stored: the mixer's stored component (PSF, ``g_v``), shaped like the
      params, or ``()`` when the schedule never reuses.
    age: int32, steps since ``stored`` was computed (0 after a recompute).
    count: int32, steps taken.
    recomputes: int32, steps that ran the ascent (two passes);
      ``recomputes / count`` is the recompute fraction.
    recomputed: bool, whether the last step ran the ascent.
    next_recompute: bool, the schedule's decision for the next step (what
      :class:`optax_sam.SpecializedStep` reads).
    last_selection: bool[L], the selection the last step used.
    branch: int32, the compiled branch the last step took (-1: a
      ``static_selection`` that did not cover the state's selection).
    branch_counts: int32[B], how many steps took each branch.
    ascent_active: float32, fraction of parameters the last step's ascent
      covered (its branch's static superset; 0 on a reuse step).
    descent_active: float32, the same for the descent pass.
    finite: bool, whether the last step's descent gradient and the updates
      the base optimizer produced from it were all finite (True after
      ``init``; from each leaf's float32 sum, so a leaf summing beyond the
      float32 range counts as not finite too). Nothing is done about a
      non-finite step besides reporting it (as in optax, a NaN gradient
      reaches the base optimizer): skip such steps with
      ``optax.apply_if_finite`` as the *base* optimizer (see
      ``docs/guide.md``, "Skipping bad steps"). Parts of the state that are not
      the base optimizer's are guarded whatever its value: a policy's or
      schedule's statistic that is not finite is not recorded, and ``stored``
      keeps its previous value when the new one is not finite.
    clean_active: float32, fraction of parameters whose gradient the last
      step's clean pass computed (1 when every leaf's was needed, e.g.
      layer-wise SAM's ``unselected="clean"``; the selection's share under
      the ``gated`` executor).
    perturbed_active: float32, the same for the pass at ``w + eps`` (0 on a
      reuse step). ``clean_active + perturbed_active`` is the step's
      backward work in parameters, against SGD's 1 and SAM's 2.
  """
  opt_state: optax.OptState
  perturbation_state: optax.OptState
  policy: Any
  schedule: Any
  stored: PyTree
  age: jax.Array
  count: jax.Array
  recomputes: jax.Array
  recomputed: jax.Array
  next_recompute: jax.Array
  last_selection: jax.Array
  branch: jax.Array
  branch_counts: jax.Array
  ascent_active: jax.Array
  descent_active: jax.Array
  finite: jax.Array
  clean_active: jax.Array
  perturbed_active: jax.Array


def recompute_fraction(state: SharpnessAwareState) -> jax.Array:
  """Fraction of the steps so far that ran the ascent (two passes)."""
  return state.recomputes / jnp.maximum(state.count, 1)


_f32 = groups_lib.f32


def all_finite(tree: PyTree) -> jax.Array:
  """bool scalar: every float leaf of ``tree`` is finite (True for a tree
  without float leaves, or with zero-size leaves only).

  Computed from each leaf's float32 sum, one reduction (half the work of
  ``all(isfinite(x))``): a NaN or an infinity anywhere makes it False, and
  so does a leaf whose finite values sum beyond the float32 range
  (``|sum| > 3.4e38``, gradients of ``1e30`` over ``3e8`` entries), which
  is worth reporting too.
  """
  sums = []
  for x in jax.tree.leaves(tree):
    if not np.size(x):
      continue
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      sums.append(jnp.sum(x, dtype=jnp.float32))
    elif jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
      sums.append(jnp.where(jnp.all(jnp.isfinite(x)), 0.0, jnp.nan))
  if not sums:
    return jnp.ones([], jnp.bool_)
  return jnp.all(jnp.isfinite(jnp.stack(sums)))


def _restricted(tree: PyTree, mask: PyTree) -> list[Any]:
  return [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask))
          if m]


def _active_leaves(static_mask: PyTree, leaf_sel: Optional[PyTree]
                   ) -> PyTree:
  """Per leaf: False outside the static mask, else the run-time selection
  (True without a policy)."""
  flags = jax.tree.leaves(static_mask)
  sel = (jax.tree.leaves(leaf_sel) if leaf_sel is not None
         else [True] * len(flags))
  return jax.tree.unflatten(jax.tree.structure(static_mask), [
      s if m else False for m, s in zip(flags, sel)])


def _active_fraction(params: PyTree, sub: PyTree, leaf_sel: PyTree
                     ) -> jax.Array:
  """Fraction of parameters in ``sub`` and the run-time selection."""
  sizes = [float(np.prod(np.shape(p))) for p in jax.tree.leaves(params)]
  total = max(sum(sizes), 1.0)
  active = jnp.zeros([], jnp.float32)
  for n, m, s in zip(sizes, jax.tree.leaves(sub), jax.tree.leaves(leaf_sel)):
    if m:
      active = active + jnp.where(s, n, 0.0)
  return active / total


def sharpness_aware(
    optimizer: optax.GradientTransformation,
    perturbation: Optional[optax.GradientTransformation] = None,
    *,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    policy: Optional[policies_lib.Policy] = None,
    schedule: Optional[schedules_lib.ReuseSchedule] = None,
    mixer: Optional[schedules_lib.Mixer] = None,
    unselected: Optional[str] = None,
    alpha: float = 1.0,
    executor: Union[str, executors_lib.Executor, None] = "auto",
    mask: groups_lib.MaskOrFn = None,
    labels: groups_lib.Labels = None,
    order: Any = None,
    stats_on: groups_lib.MaskOrFn = None,
    seed: Optional[args_lib.SeedOrKey] = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
    freeze_unselected: bool = False,
    perturb: groups_lib.MaskOrFn = None,
    descent_fn: Optional[DescentFn] = None,
    clean_pass: bool = True,
    observe: Optional[ObserveFn] = None,
) -> optax.GradientTransformationExtraArgs:
  """A sharpness-aware step: perturbation x layer policy x schedule.

  Example (C2): layer-wise SAM on the two layers with the largest gradient
  norms, recomputed 1 step in 4, ARSAM's PSF reused in between::

    tx = optax_sam.sharpness_aware(
        optax.sgd(0.1, momentum=0.9),
        optax_sam.sam_perturbation(0.05),
        policy=optax_sam.policies.top_k(2),
        schedule=optax_sam.schedules.recompute_every(4),
        mixer=optax_sam.schedules.psf_mixer())
    step = jax.jit(optax_sam.make_update(tx, loss_fn))

  Args:
    optimizer: the base optimizer that consumes the descent gradient: any
      optax transformation, ``optax.chain(...)``, an
      ``optax.inject_hyperparams`` optimizer, or ``optax.MultiSteps``.
    perturbation: the ascent transform (gradient -> ``eps``); default
      ``optax_sam.sam_perturbation(rho)`` (global normalization over the
      perturbed leaves).
    rho: SAM's radius when ``perturbation`` is None.
    policy: a :class:`optax_sam.policies.Policy` choosing the layer groups
      that take part at run time; None: every group.
    schedule: a :class:`optax_sam.schedules.ReuseSchedule`; None: recompute
      every step (no conditional, nothing stored).
    mixer: a :class:`optax_sam.schedules.Mixer`, for the steps ``schedule``
      skips; default with a schedule: ARSAM's
      :func:`optax_sam.schedules.psf_mixer` (``g + 0.7**age * psf``).
    unselected: what the leaves outside the selection (the policy's and
      ``mask``'s) descend along: ``"clean"`` (the clean gradient ``g``, the
      layer-wise paper's penalty form; the perturbed pass then covers the
      selected layers only), ``"perturbed"`` (the gradient at ``w + eps``,
      SAM's definition, a full perturbed pass) or ``"zero"`` (no update this
      step, SL-SAM's sparse descent). Default: ``"clean"`` with a policy,
      ``"perturbed"`` without one.
    alpha: on the selected leaves the descent gradient is
      ``(1 - alpha) g + alpha g_adv``, in ``[0, 1]``; 1 is SAM.
    executor: ``"gated"`` (one program whose passes skip the unselected
      leaves' weight-gradient products at run time, C2 only; see
      :func:`optax_sam.executors.gated`), ``"auto"`` (default:
      ``"switch"``, except on the CPU when the
      passes would differentiate XLA's own convolutions inside a
      conditional, 10-40x slower there: a C1 ``grad_fn`` with convolutions,
      or C2 with ``conv_backward="xla"``; those compute every step's ascent
      with no conditional, SAM's cost, see
      :func:`optax_sam.executors.auto`), ``"switch"`` (one program, a
      ``lax.switch`` over the menu x recompute/reuse), ``"specialize"``
      (one program per decision, driven by :class:`optax_sam.SpecializedStep`),
      ``"dense"`` (the selection applied as a mask: the reference, no saving
      from it; recompute/reuse stays a conditional), or an
      :class:`optax_sam.Executor`.
    mask: static subset of leaves that may be perturbed (a pytree of bools
      shaped like params, or ``params -> mask``); None: every leaf.
    labels: layer labels (see :func:`optax_sam.layer_groups`).
    order: group order, input side first (see
      :func:`optax_sam.layer_groups`).
    stats_on: leaves whose norms feed the schedule's statistics (mask or
      ``params -> mask``); default every leaf.
    seed: PRNG seed (identical on every device) of the policy and the
      schedule: an int, a raw ``uint32`` key or a typed key. A policy built
      with its own seed (``bandit(seed=...)``) keeps it; giving a different
      one here raises ``ValueError``. Default 0.
    axis_name: average the gradients over this mapped axis
      (``jax.pmap``/``jax.shard_map``); policies and schedules then read
      averaged statistics and decide identically on every device.
    sync_ascent: also average the ascent gradient over ``axis_name``
      (default False: each device perturbs with its own shard's gradient,
      m-sharpness, as in the SAM authors' code).
    freeze_unselected: with ``unselected="zero"``, the leaves outside the
      step's selection are frozen: zero update, and every part of the base
      optimizer's state shaped like the parameters (momenta, Adam moments)
      keeps its value for them, as PyTorch skips a tensor without a
      gradient (no weight decay either). Shared scalars of the state, such
      as optax's single step ``count``, still advance every step (PyTorch
      keeps one per tensor): Adam's bias correction then follows the global
      step. False (default): they get a zero gradient, which the base
      optimizer's momentum and weight decay still act on.
    perturb: deprecated name of ``mask``.
    descent_fn: ``descent_fn(g, descent) -> descent``, applied on a recompute
      step to the descent gradient the engine formed (``g`` the clean
      gradient, zero on leaves the clean pass did not cover), e.g. GSAM's
      ``g_adv - alpha g_perp``; None: the descent as formed.
    clean_pass: False: no pass at ``w`` (one gradient pass per step): the
      perturbation gets a zero gradient and must form ``eps`` from its own
      state (MSAM's momentum), and the C2 loss and aux are those of the
      pass at ``w + eps``. Needs no policy, no schedule, ``alpha=1``.
    observe: ``observe(perturbation_state, descent) -> perturbation_state``,
      called at the end of every step with the descent gradient (e.g. a
      perturbation that keeps a momentum of the descent gradients).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`SharpnessAwareState`. Its ``update`` takes ``grad_fn`` (C1) or
    is driven by :func:`optax_sam.make_update` (C2); ``static_selection=``
    and ``static_recompute=`` (passed by :class:`optax_sam.SpecializedStep`)
    compile one decision as its own program; any other keyword arguments go
    to the base optimizer.
  """
  optimizer = as_extra_args(optimizer)
  mask = args_lib.renamed(mask, perturb, "mask", "perturb", None)
  if not clean_pass and (policy is not None or schedule is not None
                         or (not args_lib.is_traced(alpha) and alpha != 1.0)
                         or unselected not in (None, "perturbed")):
    raise ValueError("clean_pass=False (one pass at w + eps) needs no policy, "
                     "no schedule, alpha=1 and unselected='perturbed'.")
  if perturbation is None:
    perturbation = perturb_lib.sam_perturbation(rho)
  if policy is not None and not isinstance(policy, policies_lib.Policy):
    raise TypeError(f"policy must be an optax_sam.policies.Policy (e.g. "
                    f"optax_sam.policies.top_k(2)), got {policy!r}.")
  if schedule is None:
    schedule = schedules_lib.recompute_always()
  elif mixer is None:
    from optax_sam._src import arsam as arsam_lib  # pylint: disable=g-import-not-at-top
    mixer = arsam_lib.psf_mixer()
  if not isinstance(schedule, schedules_lib.ReuseSchedule):
    raise TypeError(f"schedule must be an optax_sam.schedules.ReuseSchedule "
                    f"(e.g. optax_sam.schedules.recompute_every(4)), got "
                    f"{schedule!r}.")
  if mixer is not None and not isinstance(mixer, schedules_lib.Mixer):
    raise TypeError(f"mixer must be an optax_sam.schedules.Mixer, got "
                    f"{mixer!r}.")
  if unselected is None:
    unselected = "clean" if policy is not None else "perturbed"
  if unselected not in UNSELECTED:
    raise ValueError(f"unselected must be one of {UNSELECTED}, got "
                     f"{unselected!r}.")
  if sync_ascent and axis_name is None:
    raise ValueError("sync_ascent=True needs an axis_name.")
  if freeze_unselected and unselected != "zero":
    raise ValueError("freeze_unselected=True needs unselected='zero' (the "
                     f"unselected leaves get no gradient), got {unselected!r}.")
  if mask is not None and not callable(mask):
    for m in jax.tree.leaves(mask):  # structure is checked at update
      if not isinstance(m, (bool, int)) and not hasattr(m, "dtype"):
        raise TypeError(f"mask leaves must be bools, got {m!r}.")
  alpha = args_lib.check_number(alpha, "alpha", 0.0, 1.0)
  # A traced alpha (optax.inject_hyperparams) is mixed in whatever its value.
  mix_alpha = args_lib.is_traced(alpha) or alpha != 1.0
  if policy is not None and policy.seed is not None:
    if seed is not None and args_lib.same_seed(seed, policy.seed) is False:
      raise ValueError(
          f"got seed={seed!r} and a policy built with seed={policy.seed!r}: "
          "give the seed in one place (the policy's seed=, or this seed= "
          "for a policy built without one).")
    policy_seed = policy.seed
  else:
    policy_seed = seed
  ex = executors_lib.get_executor(executor)

  def groups_of(params):
    return groups_lib.layer_groups(params, labels, order)

  def can_reuse(sched_state) -> bool:
    pred = schedule.decide(sched_state)
    return not (schedules_lib.is_static(pred) and bool(pred))

  def plan(num_groups, sched_state, oracle=None, params=None):
    pred = schedule.decide(sched_state)
    return executors_lib.plan(
        ex, num_groups, with_policy=policy is not None,
        recompute=bool(pred) if schedules_lib.is_static(pred) else None,
        reuse_needs_flags=(unselected == "zero"
                           and not hoisted(can_reuse(sched_state))),
        oracle=oracle, params=params)

  def hoisted(reuses: bool) -> bool:
    # The clean pass over every leaf, once, before the conditional: when
    # every leaf is perturbed (nothing of the forward pass can be shared with
    # the perturbed pass) and a reuse branch needs it too. Otherwise it runs
    # inside each branch, where XLA shares the forward computation of the
    # unperturbed layers with the perturbed pass (it does not across the
    # conditional's boundary).
    return reuses and policy is None and mask is None

  def init_fn(params):
    # nnx.Optimizer inits on Param-wrapped state, updates on pure state.
    params = args_lib.unwrap_flax_variables(params)
    groups = groups_of(params)
    num = groups.num_groups
    sched_state = schedule.init(args_lib.as_key(0 if seed is None else seed))
    reuses = can_reuse(sched_state)
    if policy is not None:
      pstate = policy.init(num, args_lib.as_key(
          0 if policy_seed is None else policy_seed))
      selection = pstate.selection
    else:
      pstate = ()
      selection = jnp.ones([num], bool)
    return SharpnessAwareState(
        opt_state=optimizer.init(params),
        perturbation_state=perturbation.init(params),
        policy=pstate,
        schedule=sched_state,
        stored=(jax.tree.map(jnp.zeros_like, params)
                if reuses and mixer.stores else ()),
        age=jnp.zeros([], jnp.int32),
        count=jnp.zeros([], jnp.int32),
        recomputes=jnp.zeros([], jnp.int32),
        recomputed=jnp.zeros([], jnp.bool_),
        next_recompute=jnp.asarray(decision(sched_state, jnp.zeros(
            [], jnp.int32)), jnp.bool_),
        last_selection=selection,
        branch=jnp.zeros([], jnp.int32),
        branch_counts=jnp.zeros([plan(num, sched_state).num_branches],
                                jnp.int32),
        ascent_active=jnp.zeros([], jnp.float32),
        descent_active=jnp.zeros([], jnp.float32),
        finite=jnp.ones([], jnp.bool_),
        clean_active=jnp.zeros([], jnp.float32),
        perturbed_active=jnp.zeros([], jnp.float32))

  def decision(sched_state, recomputes):
    pred = schedule.decide(sched_state)
    if schedules_lib.is_static(pred):
      return pred
    if not mixer.stores:
      return jnp.asarray(pred, jnp.bool_)
    # Nothing is stored before the first recompute.
    return jnp.logical_or(jnp.asarray(pred, jnp.bool_), recomputes == 0)

  def update_fn(updates, state, params=None, *, grad_fn=None,
                static_selection=None, static_recompute=None, **extra_args):
    if params is None:
      raise ValueError("sharpness-aware updates need params: call "
                       "tx.update(grads, state, params, grad_fn=...).")
    oracle = step_lib.as_oracle(updates, grad_fn)
    groups = groups_of(params)
    num = groups.num_groups
    static_mask = groups_lib.resolve_mask(mask, params, what="mask")
    stats_mask = groups_lib.resolve_mask(stats_on, params, what="stats_on")
    local = step_lib.as_local(params, axis_name)
    reuses = can_reuse(state.schedule)
    hoist = hoisted(reuses)
    selection = state.policy.selection if policy is not None else None
    leaf_sel = (groups.leaf_selection(selection) if selection is not None
                else None)

    if static_recompute is not None:  # decided on the host (SpecializedStep)
      pred = bool(static_recompute)
    else:
      pred = decision(state.schedule, state.recomputes)
      if not schedules_lib.is_static(pred):
        # The decision taken at the end of the last step and kept in the
        # state: the one predicate SpecializedStep and the conditional share.
        pred = state.next_recompute

    if hoist:
      g_full = oracle.clean(local)
      g_full_bar = step_lib.pmean_where(g_full, None, axis_name)

    the_plan = plan(num, state.schedule, oracle, local)
    # The gated executor: one full program whose passes skip, at run time,
    # the products that serve unselected leaves only.
    gating = the_plan.executor.name == "gated" and leaf_sel is not None
    pass_gates = leaf_sel if gating else None
    sizes = jnp.asarray(groups.sizes, jnp.float32)

    def keep(tree, sub):
      """Zeros the leaves of ``sub`` outside the run-time selection."""
      if leaf_sel is None:
        return tree
      return jax.tree.map(
          lambda x, s, m: jnp.where(s, x, jnp.zeros_like(x)) if m else x,
          tree, leaf_sel, sub)

    def body(flags, recompute):
      sub = jax.tree.map(lambda a, b: a and b,
                         groups.mask_from_flags(flags), static_mask)
      # Every leaf's clean gradient where a descent or the mixer needs it.
      full = hoist or unselected == "clean" or (unselected == "perturbed"
                                                and reuses)
      if not clean_pass:  # eps from the perturbation's state alone
        value, g = None, jax.tree.map(jnp.zeros_like, local)
        g_bar = g
      elif hoist:
        value, g, g_bar = None, g_full, g_full_bar
      else:
        value, g = oracle.clean_with_value(
            local, wrt=None if full else sub,
            gates=None if full else pass_gates)
        if not full:
          g = keep(g, sub)
        g_bar = step_lib.pmean_where(g, None if full else sub, axis_name)

      def stats(descent):
        # The policy's per-layer statistic, reduced inside the branch (where
        # XLA fuses it with the producer) rather than from a branch output.
        if policy is None:
          return None
        # "clean": every layer's clean gradient; "zero": the clean gradient
        # of the selected layers (SL-SAM's statistic); "perturbed": the
        # descent gradient.
        return groups.sq_norms(g_bar if unselected in ("clean", "zero")
                               else descent)
      g_sub = keep(step_lib.restrict(g_bar if sync_ascent else g, sub), sub)
      if gating:  # the passes cover the selection itself, at run time
        sub_fraction = _active_fraction(params, sub, leaf_sel)
      else:
        sub_fraction = groups_lib.mask_fraction(sub, params)
      zero = jnp.zeros([], jnp.float32)
      if not recompute:
        # Advances the perturbation's state (e.g. a rho schedule's count);
        # the unused perturbation itself is dropped by XLA.
        _, pstate = perturbation.update(g_sub, state.perturbation_state,
                                        params)
        age = optax.safe_increment(state.age)
        descent = mixer.mix(g_bar, state.stored, age)
        descent = jax.tree.map(lambda a, d: d.astype(a.dtype), g_bar, descent)
        if unselected == "zero":
          descent = keep(step_lib.restrict(descent, sub), sub)
        active = (zero, jnp.float32(sub_fraction if unselected == "zero"
                                    else 1.0),
                  jnp.float32(1.0 if full else sub_fraction), zero)
        rstats = schedules_lib.ReuseStats(zero, zero)
        return (value, descent, pstate, state.stored, rstats, age, active,
                stats(descent))
      eps, pstate = perturbation.update(g_sub, state.perturbation_state,
                                        params)
      eps = keep(step_lib.restrict(eps, sub), sub)
      w_adv = step_lib.add_where(local, eps, sub)
      full_descent = unselected == "perturbed"
      adv_value, g_adv = oracle.perturbed_with_value(
          w_adv, 0, wrt=None if full_descent else sub,
          gates=None if full_descent else pass_gates)
      if not clean_pass:
        value = adv_value
      g_adv = step_lib.pmean_where(g_adv, None if full_descent else sub,
                                   axis_name)

      def leaf(ga, gb, s, m):
        if not m:  # outside the static superset: never selected
          if unselected == "perturbed":
            return ga
          return gb if unselected == "clean" else jnp.zeros_like(ga)
        sel = ga if not mix_alpha else (
            (1 - alpha) * _f32(gb) + alpha * _f32(ga)).astype(ga.dtype)
        if s is None:
          return sel
        other = {"perturbed": ga, "clean": gb,
                 "zero": jnp.zeros_like(ga)}[unselected]
        return jnp.where(s, sel, other)

      sel_leaves = (jax.tree.leaves(leaf_sel) if leaf_sel is not None
                    else [None] * len(jax.tree.leaves(g_adv)))
      descent = jax.tree.unflatten(jax.tree.structure(g_adv), [
          leaf(*a) for a in zip(jax.tree.leaves(g_adv), jax.tree.leaves(g_bar),
                                sel_leaves, jax.tree.leaves(sub))])
      if descent_fn is not None:
        descent = jax.tree.map(lambda a, d: d.astype(a.dtype), g_adv,
                               descent_fn(g_bar, descent))
      if reuses and mixer.stores:
        stored = jax.tree.map(lambda s, x: x.astype(s.dtype), state.stored,
                              mixer.store(g_bar, descent))
        # A non-finite stored component (a NaN batch, or g_sam - g
        # overflowing) is not kept: it would poison every reuse step until
        # the next recompute. (Checked here, not on reuse steps, which keep
        # the stored component as it is.)
        stored_ok = all_finite(stored)
        stored = jax.tree.map(lambda new, old: jnp.where(stored_ok, new, old),
                              stored, state.stored)
        diff = [_f32(b) - _f32(a) for a, b in zip(
            _restricted(g_bar, stats_mask), _restricted(descent, stats_mask))]
        rstats = schedules_lib.ReuseStats(
            perturb_lib.safe_norm(diff),
            perturb_lib.safe_norm(_restricted(g_bar, stats_mask)))
      else:
        stored, rstats = state.stored, schedules_lib.ReuseStats(zero, zero)
      active = (jnp.float32(sub_fraction), jnp.float32(
          1.0 if full_descent else sub_fraction),
                jnp.float32(0.0 if not clean_pass else
                            1.0 if full else sub_fraction),
                jnp.float32(1.0 if full_descent else sub_fraction))
      return (value, descent, pstate, stored, rstats,
              jnp.zeros([], jnp.int32), active, stats(descent))

    out, branch = executors_lib.run(
        the_plan, body, selection=selection, recompute=pred,
        static_selection=static_selection, oracle=oracle)
    value, descent, pstate, stored, rstats, age, active, sq_norms = out
    if observe is not None:
      pstate = observe(pstate, descent)
    if value is not None:
      oracle.record(*value)
    pred_arr = jnp.asarray(pred, jnp.bool_)

    if policy is not None:
      if unselected == "clean":  # every layer's clean gradient
        observed = jnp.ones_like(selection)
      elif unselected == "zero":
        observed = selection
      else:
        observed = jnp.ones_like(selection)
      # A statistic that overflowed (a gradient spike) or is NaN is not a
      # measurement: the policy sees it as unobserved.
      finite = jnp.isfinite(sq_norms)
      new_pstate = policy.update(state.policy, policies_lib.LayerStats(
          sq_norms=jnp.where(finite, sq_norms, 0.0),
          observed=observed & finite, sizes=sizes))
      used = selection
    else:
      new_pstate, used = (), state.last_selection
    sched_state = schedule.update(state.schedule, pred_arr, rstats)
    recomputes = schedules_lib.increment_where(pred_arr, state.recomputes)
    new_updates, opt_state = optimizer.update(descent, state.opt_state,
                                              params, **extra_args)
    if freeze_unselected:
      active_leaves = _active_leaves(static_mask, leaf_sel)
      new_updates = groups_lib.keep_where(
          active_leaves, new_updates,
          jax.tree.map(jnp.zeros_like, new_updates), params)
      opt_state = groups_lib.keep_where(active_leaves, opt_state,
                                        state.opt_state, params)
    counts = state.branch_counts.at[jnp.maximum(branch, 0)].set(
        optax.safe_increment(state.branch_counts[jnp.maximum(branch, 0)]))
    return new_updates, SharpnessAwareState(
        opt_state=opt_state, perturbation_state=pstate, policy=new_pstate,
        schedule=sched_state, stored=stored, age=age,
        count=optax.safe_increment(state.count), recomputes=recomputes,
        recomputed=pred_arr,
        next_recompute=jnp.asarray(decision(sched_state, recomputes),
                                   jnp.bool_),
        last_selection=used, branch=jnp.asarray(branch, jnp.int32),
        branch_counts=counts, ascent_active=active[0],
        descent_active=active[1],
        finite=all_finite(descent) & all_finite(new_updates),
        clean_active=active[2], perturbed_active=active[3])

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------ deprecated entry points


def selective_sam(
    optimizer: optax.GradientTransformation,
    policy: policies_lib.Policy,
    *,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    perturbation: Optional[optax.GradientTransformation] = None,
    executor: Union[str, executors_lib.Executor, None] = "auto",
    restrict_descent: bool = False,
    alpha: float = 1.0,
    labels: groups_lib.Labels = None,
    order: Any = None,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
    seed: Optional[args_lib.SeedOrKey] = None,
) -> optax.GradientTransformationExtraArgs:
  """Deprecated: ``sharpness_aware(optimizer, perturbation, policy=policy,
  unselected="zero" if restrict_descent else "perturbed")``."""
  return sharpness_aware(
      optimizer, perturbation, rho=rho, policy=policy,
      unselected="zero" if restrict_descent else "perturbed", alpha=alpha,
      executor=executor, labels=labels, order=order, seed=seed,
      axis_name=axis_name, sync_ascent=sync_ascent)


def reuse_sam(
    optimizer: optax.GradientTransformation,
    schedule: schedules_lib.ReuseSchedule,
    mixer: schedules_lib.Mixer,
    *,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    perturbation: Optional[optax.GradientTransformation] = None,
    perturb: groups_lib.MaskOrFn = None,
    stats_on: groups_lib.MaskOrFn = None,
    seed: args_lib.SeedOrKey = 0,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Deprecated: ``sharpness_aware(optimizer, perturbation,
  schedule=schedule, mixer=mixer, mask=perturb)``."""
  if not isinstance(schedule, schedules_lib.ReuseSchedule):
    raise TypeError(f"schedule must be an optax_sam.schedules.ReuseSchedule "
                    f"(e.g. optax_sam.schedules.recompute_every(5)), got "
                    f"{schedule!r}.")
  if not isinstance(mixer, schedules_lib.Mixer):
    raise TypeError(f"mixer must be an optax_sam.schedules.Mixer, got "
                    f"{mixer!r}.")
  return sharpness_aware(
      optimizer, perturbation, rho=rho, schedule=schedule, mixer=mixer,
      mask=perturb, stats_on=stats_on, seed=seed, axis_name=axis_name,
      sync_ascent=sync_ascent)
