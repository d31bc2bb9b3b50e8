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
  """
  selection: jax.Array
  count: jax.Array
  key: jax.Array
  score: jax.Array


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
) -> Policy:
  """The ``k`` groups with the largest (smoothed) gradient statistic.

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

  Returns:
    A :class:`Policy` that may re-select every step; wrap it in
    :func:`reselect_every` to hold choices for N steps.
  """
  k = args_lib.check_int(k, "k", 1)
  ema = args_lib.check_number(ema, "ema", 0.0, 1.0, high_open=True)
  if statistic not in STATISTICS:
    raise ValueError(f"unknown statistic {statistic!r}; choose from "
                     f"{STATISTICS}.")

  def init(num_groups, key=None):
    _check_k(k, num_groups)
    flags = (_as_flags(initial, num_groups) if initial is not None else
             np.arange(num_groups) >= num_groups - k)
    return _state(flags, args_lib.as_key(key), jnp.full(num_groups, jnp.nan))

  def update(state, stats):
    value = _statistic(stats, statistic)
    fresh = jnp.isnan(state.score)
    smoothed = jnp.where(fresh, value, ema * state.score + (1 - ema) * value)
    score = jnp.where(stats.observed, smoothed, state.score)
    return PolicyState(top_k_mask(score, k),
                       optax.safe_increment(state.count), state.key, score)

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


def bandit(
    fraction: float = 0.2,
    eta: float = 1e-3,
    *,
    scale_invariant: bool = False,
    min_prob: float = 1e-3,
    seed: Optional[args_lib.SeedOrKey] = None,
) -> Policy:
  """EXP3-style layer sampling with importance weights (SL-SAM's rule).

  Each group ``i`` is included independently with probability ``p_i``
  (initially ``fraction``); if nothing is drawn, the draw is repeated (up to
  a bound, then the most probable group is taken). After a step, for the
  selected groups ``r_i = ||g_i||^2 / p_i`` (importance-weighted reward),
  ``loss_i = max_selected(r) - r_i``, ``w_i = p_i * exp(-eta * loss_i /
  p_i)``; unselected groups keep ``w_i = p_i``; the probabilities are then
  rescaled to sum to ``fraction * L`` and capped at 1 (and floored at
  ``min_prob`` so no group starves).

  That rule, as in the SL-SAM public code, is not scale-invariant: with small
  gradients ``eta * loss`` is tiny and the distribution stays near uniform.
  ``scale_invariant=True`` divides the rewards by their maximum first, so
  ``eta`` acts on relative rewards (our option, not the paper's).

  Args:
    fraction: expected fraction of groups selected per step (``s``).
    eta: bandit learning rate.
    scale_invariant: normalize rewards by their maximum (see above).
    min_prob: lower bound on every probability.
    seed: PRNG seed (an int, a raw or a typed key; None: 0) used when
      ``init`` gets no key, and by :func:`optax_sam.sharpness_aware`.

  Returns:
    A :class:`Policy` whose selection may change every step.
  """
  fraction = args_lib.check_number(fraction, "fraction", 0.0, 1.0,
                                   low_open=True)
  eta = args_lib.check_number(eta, "eta", 0.0)
  min_prob = args_lib.check_number(min_prob, "min_prob", 0.0, 1.0)

  def draw(key, probs):
    def body(carry):
      key, _, tries = carry
      key, sub = jax.random.split(key)
      return key, jax.random.uniform(sub, probs.shape) < probs, tries + 1

    def cond(carry):
      _, sel, tries = carry
      return jnp.logical_and(~jnp.any(sel), tries < 32)

    key, sel, _ = jax.lax.while_loop(
        cond, body, (key, jnp.zeros(probs.shape, bool), jnp.int32(0)))
    fallback = jnp.zeros(probs.shape, bool).at[jnp.argmax(probs)].set(True)
    return key, jnp.where(jnp.any(sel), sel, fallback)

  def normalise(w, num_groups):
    target = fraction * num_groups
    p = w / jnp.maximum(jnp.sum(w), 1e-30) * target
    for _ in range(3):  # cap at 1 and redistribute the excess
      p = jnp.minimum(p, 1.0)
      free = p < 1.0
      room = target - jnp.sum(jnp.where(free, 0.0, p))
      free_sum = jnp.sum(jnp.where(free, p, 0.0))
      p = jnp.where(free, p * room / jnp.maximum(free_sum, 1e-30), p)
    return jnp.clip(p, min_prob, 1.0)

  def init(num_groups, key=None):
    key = args_lib.as_key(seed if key is None else key)
    probs = jnp.full(num_groups, fraction, jnp.float32)
    key, sel = draw(key, probs)
    return _state(sel, key, probs)

  def update(state, stats):
    probs = state.score
    sel = jnp.logical_and(state.selection, stats.observed)
    reward = jnp.where(sel, stats.sq_norms / probs, 0.0)
    if scale_invariant:
      reward = reward / jnp.maximum(jnp.max(reward), 1e-30)
    best = jnp.max(jnp.where(sel, reward, -jnp.inf))
    loss = jnp.where(sel, best - reward, 0.0)
    w = jnp.where(sel, probs * jnp.exp(-eta * loss / probs), probs)
    probs = normalise(w, probs.shape[0])
    key, selection = draw(state.key, probs)
    return PolicyState(selection, optax.safe_increment(state.count), key,
                       probs)

  return Policy(init, update, lambda step: True, seed)
