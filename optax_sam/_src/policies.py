"""Selection policies: which layer groups take part in a gradient pass.

A policy is a pair of pure, jit-traceable functions over one carried state:

* ``init(num_groups, key) -> PolicyState`` with the selection for the first
  step;
* ``update(state, stats) -> PolicyState``, called at the end of every step
  with fresh per-layer statistics (:class:`LayerStats`), which decides the
  selection of the *next* step.

The selection is a boolean vector over the layer groups, in depth order
(``LayerGroups.names``). It lives in the state, so it is known before the step
that uses it starts: an executor can dispatch on it (``lax.switch``) and a
host-side loop can read it to pick a specialised program (see
``executors.py``). Decisions depend only on the carried state (including its
PRNG key) and on statistics that the engine averages over ``axis_name`` first,
so they are identical on every device.

``may_change(step)`` is a static, host-side statement of the steps before
which the selection can differ from the previous one; the re-specialising
executor reads the selection from the device only at those steps.

Policies here: :func:`fixed`, :func:`top_k` (by a smoothed per-layer
statistic), :func:`reselect_every` (hold any policy's choice for N steps),
:func:`random_k`, and :func:`bandit` (EXP3-style sampling with importance
weights, the rule of SL-SAM's public code). A method can add its own policy
by returning a :class:`Policy`.

References:
  Auer et al., `The Nonstochastic Multiarmed Bandit Problem
  <https://doi.org/10.1137/S0097539701398375>`_, SIAM J. Comput. 2002 (EXP3).

  Cheng et al., `Sparse Layer Sharpness-Aware Minimization for Efficient
  Fine-Tuning <https://arxiv.org/abs/2602.09395>`_, 2026 (SL-SAM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sam._src import arguments as args_lib


class LayerStats(NamedTuple):
  """Per-layer statistics handed to a policy at the end of a step.

  Attributes:
    sq_norms: float32[L], squared gradient norm of each group (of the pass
      the engine chose, by default the descent gradient it computes anyway).
    observed: bool[L], groups whose ``sq_norms`` were computed this step
      (others hold 0 and must not be read as a measurement).
    sizes: float32[L], number of parameters of each group.
  """
  sq_norms: jax.Array
  observed: jax.Array
  sizes: jax.Array


class PolicyState(NamedTuple):
  """State shared by all policies here.

  Attributes:
    selection: bool[L], the groups selected for the coming step.
    count: int32, number of ``update`` calls so far (= steps taken).
    key: PRNG key, replicated on every device: a raw ``uint32`` key, or a
      typed key (``jax.random.key``) when one was given.
    score: float32[L], the policy's per-group memory (smoothed statistic,
      bandit probabilities, ...).
    credit: float32 scalar, the cost (in SGD steps) a policy with an
      amortized budget has saved so far and may spend (the bandit with
      ``budget``); None (no leaf) for the others.
  """
  selection: jax.Array
  count: jax.Array
  key: jax.Array
  score: jax.Array
  credit: Optional[jax.Array] = None


class Policy(NamedTuple):
  """A selection policy (see the module docstring).

  Attributes:
    init: ``init(num_groups, key) -> PolicyState``.
    update: ``update(state, stats) -> PolicyState``.
    may_change: ``may_change(step) -> bool``, static, on the host.
    seed: the seed (or key) the policy was built with, or None when none was
      given; :func:`optax_sam.sharpness_aware` initialises the policy with it.
  """
  init: Callable[[int, jax.Array], PolicyState]
  update: Callable[[PolicyState, LayerStats], PolicyState]
  may_change: Callable[[int], bool]
  seed: Optional[Any] = None


def _as_flags(selected: Sequence[Union[int, bool]], num_groups: int
              ) -> np.ndarray:
  """Group positions (ints, negative from the end) or bools -> bool[L]."""
  selected = list(selected)
  if selected and all(isinstance(s, (bool, np.bool_)) for s in selected):
    flags = np.asarray(selected, bool)
    if flags.shape != (num_groups,):
      raise ValueError(f"a boolean selection needs {num_groups} entries, got "
                       f"{flags.shape[0]}.")
  else:
    flags = np.zeros(num_groups, bool)
    for s in selected:
      if not -num_groups <= int(s) < num_groups:
        raise ValueError(f"group position {s} out of range for {num_groups} "
                         "groups.")
      flags[int(s)] = True
  if not flags.any():
    raise ValueError("the selection is empty: select at least one layer.")
  return flags


def _check_k(k: int, num_groups: int) -> None:
  if args_lib.is_traced(k):  # e.g. from optax.inject_hyperparams
    return
  if not 1 <= k <= num_groups:
    raise ValueError(f"k must be in [1, {num_groups}] (the number of layer "
                     f"groups), got {k}.")


def _state(flags, key, score=None) -> PolicyState:
  flags = jnp.asarray(flags, bool)
  if score is None:
    score = jnp.zeros(flags.shape, jnp.float32)
  return PolicyState(flags, jnp.zeros([], jnp.int32), key,
                     jnp.asarray(score, jnp.float32))


def top_k_mask(score: jax.Array, k: int) -> jax.Array:
  """bool[L] with True on the ``k`` largest scores (ties: deeper group wins).

  Deterministic and jit-traceable, ``k`` included (it may be a traced
  integer, e.g. from ``optax.inject_hyperparams``); NaN scores count as the
  smallest.
  """
  n = score.shape[0]
  score = jnp.where(jnp.isnan(score), -jnp.inf, score)
  # Stable tie-break towards the output side: add a tiny rank by position.
  order = jnp.lexsort((jnp.arange(n), score))  # ascending by score, then index
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return rank >= n - k


RESTRICTS = ("perturbed", "both")


def _check_restrict(restrict: str) -> None:
  if restrict not in RESTRICTS:
    raise ValueError(f"unknown restrict {restrict!r}; choose from "
                     f"{RESTRICTS}.")


def _cost_terms(costs: jax.Array, restrict: str):
  """(cost of {d} alone for each d, cost of adding a group above it per unit
  of its share), in SGD steps, for :func:`selection_cost`'s model."""
  suffix = jnp.cumsum(costs[::-1])[::-1]  # sum_{j>=d} c_j
  strictly = jnp.concatenate([suffix[1:], jnp.zeros([1], jnp.float32)])
  unit = 3.0 - costs[0]  # an SGD step
  if restrict == "perturbed":
    return 1.0 + (suffix + strictly + costs) / unit, 1.0 / unit
  return 2.0 * (1.0 + strictly + costs) / unit, 2.0 / unit


def selection_cost(flags: jax.Array, costs: jax.Array, *,
                   restrict: str = "perturbed") -> jax.Array:
  """Modelled cost of a step that perturbs the groups ``flags``, in SGD steps.

  ``costs`` are the groups' shares of the forward pass (input side first,
  summing to 1); an SGD step is one forward and a backward of twice its
  cost, less the input gradient of the first group, which nothing needs
  (``3 - c_0`` units). With ``d`` the deepest selected group and ``S`` the
  selection:

  * ``restrict="perturbed"`` (the clean pass over every layer, the perturbed
    pass restricted to the selection: ``unselected="clean"``, as
    :func:`optax_sam.layerwise_sam`): the perturbed pass re-runs the
    forward from ``d`` up (XLA shares the part below with the clean pass),
    propagates the cotangent down to ``d`` (the input-gradient products of
    the groups above it) and forms the weight gradients of ``S`` only::

      cost = 1 + (sum_{j>=d} c_j + sum_{j>d} c_j + sum_{j in S} c_j)
                 / (3 - c_0)

  * ``restrict="both"`` (both passes restricted: ``unselected="zero"``, as
    :func:`optax_sam.slsam`): each pass runs the whole forward (the gated
    executor decides ``d`` at run time, so nothing below it is shared) and
    the backward down to ``d`` with the weight gradients of ``S``::

      cost = 2 (1 + sum_{j>d} c_j + sum_{j in S} c_j) / (3 - c_0)

    which is below 1 (an SGD step) for a small selection near the output.

  An empty selection costs 1 (an SGD step). The model counts the matrix
  products only (a dense layer's three products each cost about a
  forward); on an MLP XLA's compiled FLOPs ran within 0.02 of it
  (``tests/test_frontier.py``), and measured wall-time ratios are reported
  by ``benchmarks/cost.py``.
  """
  _check_restrict(restrict)
  flags = jnp.asarray(flags, bool)
  costs = jnp.asarray(costs, jnp.float32)
  n = flags.shape[0]
  idx = jnp.arange(n)
  any_ = jnp.any(flags)
  deepest = jnp.where(any_, jnp.argmax(flags), 0)
  base, per = _cost_terms(costs, restrict)
  others = jnp.sum(jnp.where(flags & (idx != deepest), costs, 0.0))
  return jnp.where(any_, base[deepest] + per * others, 1.0)


def budget_mask(score: jax.Array, k: Any, costs: jax.Array,
                budget: Any, *, restrict: str = "perturbed",
                allowed: Optional[jax.Array] = None) -> jax.Array:
  """bool[L]: at most ``k`` groups of largest total ``score`` whose
  :func:`selection_cost` (with ``restrict``) stays within ``budget`` (SGD
  steps), taken from the ``allowed`` groups (default: all).

  For each possible deepest group ``d`` the selection is ``d`` plus, among
  the groups above it, those of largest score per unit of cost (greedy) while
  the cost stays within the budget; the best such selection by total score
  wins. When no selection fits, the single cheapest group is selected,
  allowed or not (the budget cannot be met by selection alone: combine with
  a recompute schedule). NaN scores count as 0. Jit-traceable.
  """
  _check_restrict(restrict)
  n = score.shape[0]
  score = jnp.where(jnp.isnan(score), 0.0, jnp.asarray(score, jnp.float32))
  costs = jnp.asarray(costs, jnp.float32)
  allowed = (jnp.ones(n, bool) if allowed is None
             else jnp.asarray(allowed, bool))
  idx = jnp.arange(n)
  base, per = _cost_terms(costs, restrict)  # cost of {d} alone
  room = budget - base  # what the groups above d may add
  cand = (idx[None, :] > idx[:, None]) & allowed[None, :]  # [d, j]: j above d
  ratio = score / jnp.maximum(costs, 1e-12)
  keyed = jnp.where(cand, ratio[None, :], -jnp.inf)
  order = jnp.argsort(-keyed, axis=1, stable=True)
  c_sorted = jnp.take_along_axis(jnp.broadcast_to(costs, (n, n)), order, 1)
  ok_sorted = jnp.take_along_axis(cand, order, 1)
  cum = jnp.cumsum(jnp.where(ok_sorted, c_sorted, 0.0) * per, axis=1)
  rank = jnp.arange(n)[None, :]
  take_sorted = ok_sorted & (cum <= room[:, None] + 1e-6) & (rank < k - 1)
  take = jnp.zeros((n, n), bool).at[jnp.arange(n)[:, None], order].set(
      take_sorted)
  take = take | (idx[None, :] == idx[:, None])  # d itself
  value = jnp.sum(jnp.where(take, score[None, :], 0.0), axis=1)
  feasible = (room >= -1e-6) & allowed
  best = jnp.argmax(jnp.where(feasible, value, -jnp.inf))
  cheapest = jnp.zeros(n, bool).at[jnp.argmin(base)].set(True)
  return jnp.where(jnp.any(feasible), take[best], cheapest)


def check_costs(costs: Optional[Sequence[float]]) -> Optional[np.ndarray]:
  """Validates per-group forward shares (None passes through)."""
  if costs is None:
    return None
  costs = np.asarray(costs, np.float32)
  if costs.ndim != 1 or not np.all(np.isfinite(costs)) or np.any(
      costs < 0) or not costs.sum() > 0:
    raise ValueError("costs must be a non-negative vector with a positive "
                     f"sum (one entry per layer group), got {costs}.")
  return costs


def cost_shares(costs: Optional[np.ndarray], num_groups: int,
                sizes: Optional[jax.Array] = None) -> jax.Array:
  """Normalized forward shares: ``costs``, else the groups' ``sizes``."""
  if costs is not None and costs.shape[0] != num_groups:
    raise ValueError(f"costs has {costs.shape[0]} entries for "
                     f"{num_groups} layer groups.")
  c = jnp.asarray(costs if costs is not None else sizes, jnp.float32)
  return c / jnp.sum(c)


# --------------------------------------------------------------- policies


def fixed(selected: Sequence[Union[int, bool]]) -> Policy:
  """Always the same groups (positions in depth order, or bools)."""

  def init(num_groups, key=None):
    return _state(_as_flags(selected, num_groups), args_lib.as_key(key))

  def update(state, stats):
    del stats
    return state._replace(count=optax.safe_increment(state.count))

  return Policy(init, update, lambda step: step == 0)


STATISTICS = ("norm", "sq_norm", "rms")


def _statistic(stats: LayerStats, name: str) -> jax.Array:
  if name == "sq_norm":
    return stats.sq_norms
  if name == "norm":
    return jnp.sqrt(stats.sq_norms)
  if name == "rms":  # norm per sqrt(parameter): size-normalized
    return jnp.sqrt(stats.sq_norms / jnp.maximum(stats.sizes, 1.0))
  raise ValueError(f"unknown statistic {name!r}; choose from {STATISTICS}.")


def top_k(
    k: int,
    *,
    statistic: str = "norm",
    ema: float = 0.0,
    initial: Optional[Sequence[Union[int, bool]]] = None,
    budget: Optional[float] = None,
    costs: Optional[Sequence[float]] = None,
) -> Policy:
  """The ``k`` groups with the largest (smoothed) gradient statistic.

  With ``budget`` (times an SGD step, e.g. 1.25) the selection is
  cost-aware: at most ``k`` groups whose modelled step cost
  (:func:`selection_cost`) stays within the budget, chosen by statistic per
  unit of cost (:func:`budget_mask`). On an MLP, where the input layer has
  the largest gradient norm and perturbing it costs a whole backward pass
  (about 2x SGD), a budget moves the selection to the layers above it.

  Args:
    k: number of groups selected each step.
    statistic: per-group statistic of the gradient the engine observes:
      ``"norm"`` (L2 norm), ``"sq_norm"`` or ``"rms"`` (norm divided by the
      square root of the group's size, so large layers do not win by size).
    ema: smoothing, ``score = ema * score + (1 - ema) * statistic`` on
      observed groups (0: the last step's value only). The first observation
      of a group initialises its score.
    initial: selection before any statistic exists; default the last ``k``
      groups (output side).
    budget: the largest modelled cost of a step, in SGD steps (> 1); None:
      no limit. It bounds a recompute step: with a recompute schedule of
      fraction ``f`` the amortized cost is ``1 + f * (budget - 1)``.
    costs: each group's share of the forward pass (input side first; any
      positive scale, normalized), e.g. measured FLOPs per layer; default:
      the groups' parameter counts (exact for dense layers; a convolution's
      forward costs more per parameter at high resolution).

  Returns:
    A :class:`Policy` that may re-select every step; wrap it in
    :func:`reselect_every` to hold choices for N steps.
  """
  k = args_lib.check_int(k, "k", 1)
  ema = args_lib.check_number(ema, "ema", 0.0, 1.0, high_open=True)
  if statistic not in STATISTICS:
    raise ValueError(f"unknown statistic {statistic!r}; choose from "
                     f"{STATISTICS}.")

  if budget is not None:
    budget = args_lib.check_number(budget, "budget", 1.0)
  costs = check_costs(costs)

  def init(num_groups, key=None):
    _check_k(k, num_groups)
    if costs is not None:
      cost_shares(costs, num_groups)  # the length, checked early
    if initial is not None:
      flags = _as_flags(initial, num_groups)
    else:
      flags = np.arange(num_groups) >= num_groups - k
      if budget is not None:  # the output side, as far as the budget goes
        flags = np.arange(num_groups) >= num_groups - 1
    return _state(flags, args_lib.as_key(key), jnp.full(num_groups, jnp.nan))

  def update(state, stats):
    value = _statistic(stats, statistic)
    fresh = jnp.isnan(state.score)
    smoothed = jnp.where(fresh, value, ema * state.score + (1 - ema) * value)
    score = jnp.where(stats.observed, smoothed, state.score)
    if budget is None:
      selection = top_k_mask(score, k)
    else:
      selection = budget_mask(
          score, k, cost_shares(costs, score.shape[0], stats.sizes), budget)
    return PolicyState(selection, optax.safe_increment(state.count),
                       state.key, score)

  return Policy(init, update, lambda step: True)


def reselect_every(policy: Policy, every: int) -> Policy:
  """Holds ``policy``'s selection for ``every`` steps.

  The inner policy still sees every step's statistics (its smoothing keeps
  running); its choice is adopted only before steps ``every, 2*every, ...``.
  """
  every = args_lib.check_int(every, "every", 1)

  def update(state, stats):
    new = policy.update(state, stats)
    adopt = new.count % every == 0
    return new._replace(
        selection=jnp.where(adopt, new.selection, state.selection))

  return Policy(policy.init, update,
                lambda step: step == 0 or step % every == 0, policy.seed)


def random_k(k: int, seed: Optional[args_lib.SeedOrKey] = None) -> Policy:
  """``k`` groups drawn uniformly at random every step (a baseline).

  ``seed`` (an int, a raw or a typed key; None: 0) is used when ``init``
  gets no key, and by :func:`optax_sam.sharpness_aware`.
  """
  k = args_lib.check_int(k, "k", 1)

  def draw(key, num_groups):
    perm = jax.random.permutation(key, num_groups)
    return jnp.zeros(num_groups, bool).at[perm].set(jnp.arange(num_groups) < k)

  def init(num_groups, key=None):
    _check_k(k, num_groups)
    key = args_lib.as_key(seed if key is None else key)
    key, sub = jax.random.split(key)
    return _state(draw(sub, num_groups), key)

  def update(state, stats):
    key, sub = jax.random.split(state.key)
    return state._replace(selection=draw(sub, stats.sq_norms.shape[0]),
                          count=optax.safe_increment(state.count), key=key)

  return Policy(init, update, lambda step: True, seed)


def cap_to_budget(w: jax.Array, budget: Any) -> jax.Array:
  """Probabilities from weights ``w`` that sum to ``budget``, none above 1.

  The exact capping of EXP3.M (and of SL-SAM's ``get_prob``): in decreasing
  order of weight, an arm is capped at probability 1 (and the budget reduced
  by 1) while its share ``w_i * budget / sum(remaining w)`` would exceed 1;
  the remaining arms share the remaining budget in proportion to their
  weights. ``sum(remaining w)`` is floored at ``1e-5``, as in the code.
  Jit-traceable (a sort and a prefix scan, no Python loop).
  """
  n = w.shape[0]
  order = jnp.argsort(-w, stable=True)
  ws = w[order]
  suffix = jnp.cumsum(ws[::-1])[::-1]  # sum(ws[j:])
  j = jnp.arange(n)
  room = budget - j  # budget left after capping the j largest
  fits = ws * room <= jnp.maximum(suffix, 1e-5)
  first = jnp.where(jnp.any(fits), jnp.argmax(fits), n)
  share = ws * (budget - first) / jnp.maximum(
      suffix[jnp.minimum(first, n - 1)], 1e-5)
  ps = jnp.where(j < first, 1.0, share)
  return jnp.zeros_like(w).at[order].set(ps)


def bandit(
    fraction: float = 0.5,
    eta: float = 1e-3,
    *,
    scale_invariant: bool = False,
    min_prob: float = 1e-8,
    max_draws: int = 32,
    seed: Optional[args_lib.SeedOrKey] = None,
    budget: Optional[float] = None,
    costs: Optional[Sequence[float]] = None,
    restrict: str = "both",
) -> Policy:
  """EXP3.M-style sampling of arms by gradient norm (SL-SAM's rule).

  The rule of the SL-SAM authors' code (``SLSAM.get_prob`` and
  ``set_requires_grad`` in ``github.com/chengyif/SL-SAM``), with one arm per
  layer group (:func:`optax_sam.slsam` makes every parameter leaf a group):

  * every arm starts with probability ``p_i = fraction`` (``s``);
  * each step, arm ``i`` is drawn independently with probability ``p_i``;
    when nothing is drawn the draw is repeated (the code repeats until one
    arm is drawn; here at most ``max_draws`` times, then the most probable
    arm is taken). The draw for the next step is made at the end of this
    one;
  * after the step, with ``g_i`` the gradient norm of each *selected* arm
    (SL-SAM: of the clean pass), ``r_i = (g_i / p_i)**2`` and the loss
    ``l_i = max_j r_j - r_i`` over the selected arms. The code writes it as
    ``l_raw = -(g_i/p_i)**2 + (L/p_min)**2; l = l_raw - min(l_raw)`` with
    ``L = max g`` and ``p_min = 0.001``: the constant cancels exactly, so it
    is left out here (in float32 it would only add rounding error);
  * ``w_i = p_i exp(-eta l_i / p_i)`` for the selected arms, ``w_i = p_i``
    for the others; the new probabilities are ``w`` capped to the budget
    ``fraction * L`` by :func:`cap_to_budget` (exact, as the code's sorted
    loop), then clipped to ``[min_prob, 1]`` (the code: ``[1e-8, 1]``).

  The rule is not scale-invariant: with small gradient norms ``eta * l_i``
  is tiny and the probabilities stay near ``fraction``.
  ``scale_invariant=True`` divides ``r`` by its maximum over the selected
  arms first, so ``eta`` acts on relative rewards (this library's option,
  not the paper's). A statistic that is not finite (a gradient spike that
  overflowed, a NaN) is not recorded: the engine marks it unobserved, and
  an unobserved arm keeps its weight.

  With ``budget`` (times an SGD step, amortized; this library's option,
  not the paper's) the draws are held to a cost on average: the policy keeps
  a credit ``c`` (``state.credit``, starting at 0), the cost saved so far. A
  draw whose modelled cost (:func:`selection_cost` with ``restrict``; both
  passes restricted to the drawn arms, as in :func:`optax_sam.slsam`) is
  within ``budget + c`` is kept whole; a dearer one is trimmed to the drawn
  arms of largest probability per unit of cost that fit ``budget + c``
  (:func:`budget_mask` with ``allowed`` = the draw; when no drawn arm fits,
  the cheapest arm is taken). Then ``c <- min(c + budget - cost, cap)`` with
  ``cap = selection_cost(every arm) - budget``, so saving stops once any
  draw is affordable. The mean modelled cost over any run is then at most
  ``budget`` (while the cheapest arm fits it), and an expensive arm is still
  drawn now and then: with SL-SAM's ``freeze`` an arm that never fits
  would never be trained. Trimming lowers the inclusion probability of
  expensive arms below ``p_i``, while the rewards keep the ``1 / p_i``
  weights of the draw: the rule is then no longer EXP3.M's unbiased
  estimate. Without ``costs`` the shares come from the groups' sizes, which
  the policy learns at its first update: the first step then takes the
  output side arm alone.

  Args:
    fraction: the budget ``s``: expected fraction of arms drawn per step.
    eta: the bandit's learning rate (the code's ``alpha_p = 0.001``).
    scale_invariant: normalize the rewards by their maximum (see above).
    min_prob: lower bound on every probability (the code's 1e-8).
    max_draws: bound on the repeated draws when nothing is drawn.
    seed: PRNG seed (an int, a raw or a typed key; None: 0) used when
      ``init`` gets no key, and by :func:`optax_sam.sharpness_aware`.
    budget: the mean modelled cost of a step, in SGD steps (> 0), held by
      the credit above; None: no limit (the paper's rule).
    costs: each arm's share of the forward pass (input side first; any
      positive scale), for ``budget``; default: the arms' parameter counts.
    restrict: the cost model of :func:`selection_cost`: ``"both"`` (the
      clean and the perturbed pass restricted to the draw, SL-SAM) or
      ``"perturbed"``.

  Returns:
    A :class:`Policy` whose selection may change every step; its
    ``score`` holds the probabilities ``p``.

  References:
    Cheng et al., `Sparse Layer Sharpness-Aware Minimization for Efficient
    Fine-Tuning <https://arxiv.org/abs/2602.09395>`_, 2026.

    Uchiya et al., `Algorithms for Adversarial Bandit Problems with Multiple
    Plays <https://doi.org/10.1007/978-3-642-16108-7_30>`_, ALT 2010
    (EXP3.M).
  """
  fraction = args_lib.check_number(fraction, "fraction", 0.0, 1.0,
                                   low_open=True)
  eta = args_lib.check_number(eta, "eta", 0.0)
  min_prob = args_lib.check_number(min_prob, "min_prob", 0.0, 1.0)
  max_draws = args_lib.check_int(max_draws, "max_draws", 1)
  if budget is not None:
    budget = args_lib.check_number(budget, "budget", 0.0, low_open=True)
  costs = check_costs(costs)
  _check_restrict(restrict)

  def spend(sel, probs, sizes, credit):
    """The draw held to ``budget + credit``, and the credit after it."""
    shares = cost_shares(costs, probs.shape[0], sizes)
    cost = selection_cost(sel, shares, restrict=restrict)
    trimmed = budget_mask(probs, probs.shape[0], shares, budget + credit,
                          restrict=restrict, allowed=sel)
    sel = jnp.where(cost <= budget + credit + 1e-6, sel, trimmed)
    cap = selection_cost(jnp.ones_like(sel), shares,
                         restrict=restrict) - budget
    spent = selection_cost(sel, shares, restrict=restrict)
    return sel, jnp.minimum(credit + budget - spent, jnp.maximum(cap, 0.0))

  def draw(key, probs):
    def body(carry):
      key, _, tries = carry
      key, sub = jax.random.split(key)
      return key, jax.random.uniform(sub, probs.shape) < probs, tries + 1

    def cond(carry):
      _, sel, tries = carry
      return jnp.logical_and(~jnp.any(sel), tries < max_draws)

    key, sel, _ = jax.lax.while_loop(
        cond, body, (key, jnp.zeros(probs.shape, bool), jnp.int32(0)))
    fallback = jnp.zeros(probs.shape, bool).at[jnp.argmax(probs)].set(True)
    return key, jnp.where(jnp.any(sel), sel, fallback)

  def init(num_groups, key=None):
    key = args_lib.as_key(seed if key is None else key)
    probs = jnp.full(num_groups, fraction, jnp.float32)
    key, sel = draw(key, probs)
    if budget is None:
      return _state(sel, key, probs)
    credit = jnp.zeros([], jnp.float32)
    if costs is None:  # sizes come with the stats: the output side first
      sel = jnp.arange(num_groups) == num_groups - 1
    else:
      sel, credit = spend(sel, probs, None, credit)
    return _state(sel, key, probs)._replace(credit=credit)

  def update(state, stats):
    probs = state.score
    sel = state.selection & stats.observed & jnp.isfinite(stats.sq_norms)
    # (g / p)**2 from the squared norm; where nothing is selected, 0.
    reward = jnp.where(sel, stats.sq_norms / jnp.square(probs), 0.0)
    best = jnp.max(jnp.where(sel, reward, 0.0))
    if scale_invariant:
      reward = reward / jnp.maximum(best, 1e-30)
      best = jnp.where(jnp.any(sel), 1.0, 0.0)
    loss = jnp.where(sel, best - reward, 0.0)
    w = jnp.where(sel, probs * jnp.exp(-eta * loss / probs), probs)
    new = jnp.clip(cap_to_budget(w, fraction * probs.shape[0]), min_prob, 1.0)
    # A step whose rewards overflowed changes nothing (its arms count as
    # unobserved); a non-finite probability never enters the state.
    new = jnp.where(jnp.all(jnp.isfinite(new)), new, probs)
    key, selection = draw(state.key, new)
    credit = state.credit
    if budget is not None:
      selection, credit = spend(selection, new, stats.sizes, credit)
    return PolicyState(selection, optax.safe_increment(state.count), key,
                       new.astype(jnp.float32), credit)

  return Policy(init, update, lambda step: True, seed)
