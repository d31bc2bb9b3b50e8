"""Recompute schedules and mixers: *when* SAM's ascent runs, and what the
descent uses on the other steps.

SAM's gradient at ``w`` splits into the SGD gradient ``g = grad L(w)`` and a
second-order part: to first order ``g_sam - g ~ rho * H g / ||g||`` (the
Hessian applied along ``g``). That part changes slowly during training, so a
family of methods computes ``g_sam`` only on some steps ("recompute"), keeps a
component of it, and on the other steps ("reuse") combines the fresh ``g``
with the stored component, at the cost of one gradient pass.

* A **schedule** (:class:`ReuseSchedule`) decides on which steps to
  recompute. It is a pair of pure functions over a carried state:
  ``decide(state)`` returns the step's boolean predicate, ``update(state,
  recomputed, stats)`` advances the state at the end of the step. Randomness
  comes from a PRNG key in the state, folded with the step count, and
  adaptive rules read only statistics of averaged (``axis_name``)
  gradients, so the predicate is the same on every device. Here:
  :func:`recompute_every` (a fixed interval), :func:`recompute_with_probability`
  (Bernoulli), and the static :func:`recompute_always` (SAM) and
  :func:`recompute_never`. ARSAM's adaptive rule,
  :func:`optax_sam.schedules.recompute_adaptive`, lives with ARSAM.
  :func:`late_phase` runs another schedule only in the last part of
  training (SAM late in training, Zhou et al. 2025), and
  :func:`target_fraction_bounds` is the shared arithmetic of a target
  recompute fraction.
* A **mixer** (:class:`Mixer`) says what a recompute step stores and how a
  reuse step forms its descent direction: :func:`plain_mixer` (the SGD
  gradient: periodic and late-phase SAM); ARSAM's ``psf_mixer`` and
  LookSAM's ``orthogonal_mixer`` live with those methods.

The engine (:func:`optax_sam.sharpness_aware`) runs the clean pass once and
the ascent only in the recompute branch of its conditional, so a reuse step
costs one gradient pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sam._src import arguments as args_lib

PyTree = Any
Predicate = Union[bool, jax.Array]


class ReuseStats(NamedTuple):
  """Statistics of a recompute step, handed to the schedule's ``update``.

  Both are norms over the engine's ``stats_on`` leaves of gradients averaged
  over ``axis_name`` (identical on every device); zeros on reuse steps.

  Attributes:
    second_order_norm: ``||g_sam - g||`` (the norm of ARSAM's PSF).
    grad_norm: ``||g||``, the SGD gradient's norm.
  """
  second_order_norm: jax.Array
  grad_norm: jax.Array


class ReuseSchedule(NamedTuple):
  """When to recompute SAM's gradient (see the module docstring).

  Attributes:
    init: ``init(key) -> state``; ``key`` is a PRNG key replicated on every
      device.
    decide: ``decide(state) -> bool`` scalar: recompute on this step? A
      Python bool is a static decision: the engine then traces only that
      branch (no conditional).
    update: ``update(state, recomputed, stats) -> state``, at the end of every
      step, with the predicate that was used and the step's
      :class:`ReuseStats`.
  """
  init: Callable[[jax.Array], Any]
  decide: Callable[[Any], Predicate]
  update: Callable[[Any, jax.Array, ReuseStats], Any]


class ScheduleState(NamedTuple):
  """State of the simple schedules.

  Attributes:
    count: int32, steps taken so far.
    key: PRNG key, identical on every device: a raw ``uint32`` key, or a
      typed key (``jax.random.key``) when one was given.
  """
  count: jax.Array
  key: jax.Array


class Mixer(NamedTuple):
  """What a recompute step stores, and how a reuse step uses it.

  Attributes:
    store: ``store(g, g_sam) -> stored``, on recompute steps, with the
      (averaged) SGD and SAM gradients; ``stored`` is shaped like the params.
    mix: ``mix(g, stored, age) -> descent`` on reuse steps; ``age`` (int32)
      is the number of steps since ``stored`` was computed (1 on the first
      reuse step).
    stores: whether ``mix`` reads ``stored``. False (:func:`plain_mixer`):
      the engine keeps no stored component (no params-sized state) and does
      not force a recompute on the first step.
  """
  store: Callable[[PyTree, PyTree], PyTree]
  mix: Callable[[PyTree, PyTree, jax.Array], PyTree]
  stores: bool = True


def is_static(predicate: Any) -> bool:
  """Whether a schedule's decision is a Python bool (known when tracing)."""
  return isinstance(predicate, (bool, np.bool_))


def increment_where(pred: jax.Array, count: jax.Array) -> jax.Array:
  """``count + 1`` (saturating, ``optax.safe_increment``) where ``pred``."""
  return jnp.where(pred, optax.safe_increment(count), count)


def simple_init(key: jax.Array) -> ScheduleState:
  """``init`` of a schedule whose state is a step count and a key."""
  return ScheduleState(count=jnp.zeros([], jnp.int32),
                       key=args_lib.as_key(key))


def simple_update(state: ScheduleState, recomputed, stats) -> ScheduleState:
  """``update`` of a schedule whose state is a step count and a key."""
  del recomputed, stats
  return ScheduleState(optax.safe_increment(state.count), state.key)


def recompute_every(every: Any = None, offset: int = 0, *,
                    k: Any = None) -> ReuseSchedule:
  """Recompute on steps ``offset, offset + every, offset + 2 every, ...``
  (LookSAM's schedule).

  Args:
    every: the interval, an integer >= 1 (1 recomputes every step).
    offset: the first recomputing step, in ``[0, every)``.
    k: deprecated name of ``every``.

  Returns:
    A :class:`ReuseSchedule`; recompute fraction ``1 / every``.
  """
  every = args_lib.renamed(every, k, "every", "k", None)
  if every is None:
    raise TypeError("recompute_every() needs the interval: "
                    "recompute_every(every).")
  every = args_lib.check_int(every, "every", 1)
  offset = args_lib.check_int(offset, "offset", 0)
  if (not args_lib.is_traced(every) and not args_lib.is_traced(offset)
      and offset >= every):
    raise ValueError(f"offset must be in [0, every={every}), got {offset}.")

  def decide(state):
    return jnp.mod(state.count - offset, every) == 0

  return ReuseSchedule(simple_init, decide, simple_update)


def recompute_with_probability(p: float) -> ReuseSchedule:
  """Recompute on each step independently with probability ``p``.

  The draw for step ``t`` is ``uniform(fold_in(key, t)) < p``, a pure
  function of the replicated key and the step count.

  Args:
    p: the recompute probability, in ``[0, 1]``.

  Returns:
    A :class:`ReuseSchedule`; expected recompute fraction ``p``.
  """
  p = args_lib.check_number(p, "p", 0.0, 1.0)

  def decide(state):
    u = jax.random.uniform(jax.random.fold_in(state.key, state.count))
    return u < p

  return ReuseSchedule(simple_init, decide, simple_update)


def recompute_always() -> ReuseSchedule:
  """Recompute every step, statically: the engine is then plain SAM."""
  return ReuseSchedule(simple_init, lambda state: True, simple_update)


def recompute_never() -> ReuseSchedule:
  """Never recompute, statically (nothing is ever stored: the base optimizer
  on the SGD gradient). For cost measurements and ablations."""
  return ReuseSchedule(simple_init, lambda state: False, simple_update)


def plain_mixer() -> Mixer:
  """Reuse steps descend along the SGD gradient ``g``; nothing is stored.

  With :func:`recompute_every` this is periodic SAM (SAM every ``k`` steps,
  SGD in between, as in init2winit); with :func:`late_phase`, SAM late in
  training. No params-sized component is kept in the state.
  """
  return Mixer(store=lambda g, g_sam: (), mix=lambda g, stored, age: g,
               stores=False)


class LatePhaseState(NamedTuple):
  """State of :func:`late_phase`.

  Attributes:
    count: int32, steps taken so far.
    inner: the state of the schedule run from ``start`` on.
  """
  count: jax.Array
  inner: Any


def late_phase(total_steps: int, fraction: float = 0.25, *,
               then: ReuseSchedule | None = None,
               start: int | None = None) -> ReuseSchedule:
  """No ascent before step ``start``; from then on, the schedule ``then``.

  SAM applied only in the last ``fraction`` of training: Zhou et al. (ICLR
  2025) find that SAM switched on late selects a minimum nearly as flat,
  and generalizing nearly as well, as SAM throughout. Combined with
  :func:`plain_mixer` the steps before ``start`` are SGD steps (one
  gradient pass); ``then`` may itself reuse (e.g. :func:`recompute_every`
  or ARSAM's adaptive rule), or the engine may add a layer policy: the
  compositions no paper measured.

  Amortized cost with ``then = recompute_always()`` and SAM's step at
  ``c`` times SGD: ``1 + fraction * (c - 1)``.

  Args:
    total_steps: the training run's length in steps (>= 1).
    fraction: the last fraction of the steps that run ``then``, in
      ``[0, 1]`` (ignored when ``start`` is given).
    then: the schedule from ``start`` on (default: every step). Its state
      starts counting at ``start``.
    start: the first step of the late phase (default
      ``round((1 - fraction) * total_steps)``).

  Returns:
    A :class:`ReuseSchedule` with :class:`LatePhaseState`.

  References:
    Zhou et al., `Sharpness-Aware Minimization Efficiently Selects Flatter
    Minima Late in Training <https://arxiv.org/abs/2410.10373>`_, ICLR 2025.
  """
  total_steps = args_lib.check_int(total_steps, "total_steps", 1)
  fraction = args_lib.check_number(fraction, "fraction", 0.0, 1.0)
  if start is None:
    start = int(round((1.0 - float(fraction)) * total_steps))
  start = args_lib.check_int(start, "start", 0)
  inner = recompute_always() if then is None else then
  if not isinstance(inner, ReuseSchedule):
    raise TypeError(f"then must be a ReuseSchedule, got {inner!r}.")

  def init(key):
    return LatePhaseState(jnp.zeros([], jnp.int32), inner.init(key))

  def decide(state):
    late = state.count >= start
    pred = inner.decide(state.inner)
    if is_static(pred):
      return late if pred else False
    return late & jnp.asarray(pred, jnp.bool_)

  def update(state, recomputed, stats):
    late = state.count >= start
    new = inner.update(state.inner, recomputed, stats)
    kept = jax.lax.cond(late, lambda: new, lambda: state.inner)
    return LatePhaseState(optax.safe_increment(state.count), kept)

  return ReuseSchedule(init, decide, update)


def target_fraction_bounds(fraction: float, window: int,
                           max_rate: int) -> tuple[float, float]:
  """The quota range ``[lo, hi]`` per window of a target recompute fraction.

  A schedule with a target fraction ``f`` starts at ``f * window`` recomputes
  per window and may move within a factor of 2 either way: ``[max(1, f w /
  2), min(max_rate, 2 f w)]``. Shared by the adaptive schedules.
  """
  fraction = args_lib.check_number(fraction, "target_fraction", 0.0, 1.0)
  if fraction <= 0:
    raise ValueError(f"target_fraction must be > 0, got {fraction}.")
  center = fraction * window
  return (max(1.0, center / 2.0), float(min(max_rate, max(1.0, 2 * center))))
