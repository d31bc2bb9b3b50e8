"""Reuse of SAM's second-order part: schedules, mixers and the engine.

SAM's gradient at ``w`` splits into the SGD gradient ``g = grad L(w)`` and a
second-order part: to first order ``g_sam - g ~ rho * H g / ||g||`` (the
Hessian applied along ``g``). That part changes slowly during training, so a
family of methods computes ``g_sam`` only on some steps ("recompute"), keeps a
component of it, and on the other steps ("reuse") combines the fresh ``g``
with the stored component, at the cost of one gradient pass. This module holds
the pieces they share:

* **Schedules** (:class:`ReuseSchedule`) decide on which steps to recompute.
  Each is a pair of pure functions over a carried state: ``decide(state)``
  returns the step's boolean predicate, ``update(state, recomputed, stats)``
  advances the state at the end of the step. Randomness comes from a PRNG key
  in the state, folded with the step count, and the adaptive rule reads only
  statistics of averaged (``axis_name``) gradients, so the predicate is the
  same on every device. Schedules here: :func:`recompute_every` (LookSAM's
  fixed interval), :func:`recompute_with_probability` (Bernoulli),
  :func:`recompute_adaptive` (ARSAM's adaptive sampling), and the static
  :func:`recompute_always` / :func:`recompute_never`.
* **Mixers** (:class:`Mixer`) say what is stored on a recompute step and how
  the descent direction is formed on a reuse step: :func:`psf_mixer`
  (ARSAM: ``g + decay**age * psf``, ``psf = g_sam - g``) and
  :func:`orthogonal_mixer` (LookSAM: ``g + alpha ||g|| / ||g_v|| g_v``,
  ``g_v`` the part of ``g_sam`` orthogonal to ``g``).
* **The engine** :func:`reuse_sam` composes a base optimizer, a perturbation,
  a schedule and a mixer. The clean pass runs once, before a ``lax.cond`` on
  the predicate; only the recompute branch holds the perturbed pass. On
  CPU/GPU only the taken branch runs, so a reuse step costs one gradient
  (plus elementwise work) and a recompute step two, as for SAM.

References:
  Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
  <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (LookSAM).

  Deng and Pang, `Adaptively Sampling-Reusing-Mixing Decomposed Gradients to
  Speed Up Sharpness Aware Minimization <https://arxiv.org/abs/2510.03763>`_,
  2025 (ARSAM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import sam as sam_lib
from optax_sam._src import step as step_lib

PyTree = Any
Predicate = Union[bool, jax.Array]


# ---------------------------------------------------------------------------
# Schedules.


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
      branch (no ``lax.cond``).
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


def _simple_init(key: jax.Array) -> ScheduleState:
  return ScheduleState(count=jnp.zeros([], jnp.int32),
                       key=args_lib.as_key(key))


def _simple_update(state: ScheduleState, recomputed, stats) -> ScheduleState:
  del recomputed, stats
  return ScheduleState(optax.safe_increment(state.count), state.key)


def _increment_where(pred: jax.Array, count: jax.Array) -> jax.Array:
  """``count + 1`` (saturating, ``optax.safe_increment``) where ``pred``."""
  return jnp.where(pred, optax.safe_increment(count), count)


def recompute_every(k: int, offset: int = 0) -> ReuseSchedule:
  """Recompute on steps ``offset, offset + k, offset + 2k, ...`` (LookSAM).

  Args:
    k: the interval, an integer >= 1 (``k=1`` recomputes every step).
    offset: the first recomputing step, in ``[0, k)``.

  Returns:
    A :class:`ReuseSchedule`; recompute fraction ``1/k``.
  """
  k = args_lib.check_int(k, "k", 1)
  offset = args_lib.check_int(offset, "offset", 0)
  if (not args_lib.is_traced(k) and not args_lib.is_traced(offset)
      and offset >= k):
    raise ValueError(f"offset must be in [0, k={k}), got {offset}.")

  def decide(state):
    return jnp.mod(state.count - offset, k) == 0

  return ReuseSchedule(_simple_init, decide, _simple_update)


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

  return ReuseSchedule(_simple_init, decide, _simple_update)


def recompute_always() -> ReuseSchedule:
  """Recompute every step, statically: the engine is then plain SAM."""
  return ReuseSchedule(_simple_init, lambda state: True, _simple_update)


def recompute_never() -> ReuseSchedule:
  """Never recompute, statically (nothing is ever stored: the base optimizer
  on the SGD gradient). For cost measurements and ablations."""
  return ReuseSchedule(_simple_init, lambda state: False, _simple_update)


class AdaptiveScheduleState(NamedTuple):
  """State of :func:`recompute_adaptive`.

  Attributes:
    count: int32, steps taken so far.
    key: PRNG key, identical on every device.
    rate: float32, the target number of recomputes per window.
    done: int32, recomputes so far in the current window.
    norms: float32[window], ``||psf||`` of the last ``window`` recomputes,
      oldest first (zeros before that many were observed).
    ratios: float32[window], ``||psf|| / ||g||`` of the same recomputes.
    variances: float32[window], the block-wise variance of ``norms`` after
      each of the same recomputes.
    observed: int32, recomputes observed so far.
  """
  count: jax.Array
  key: jax.Array
  rate: jax.Array
  done: jax.Array
  norms: jax.Array
  ratios: jax.Array
  variances: jax.Array
  observed: jax.Array


def _push(history: jax.Array, value: jax.Array) -> jax.Array:
  """Drops the oldest entry and appends ``value`` (oldest first)."""
  return jnp.concatenate([history[1:], jnp.reshape(value, (1,))])


def block_variance(norms: jax.Array, blocks: int) -> jax.Array:
  """Mean over ``blocks`` equal blocks of the sorted ``norms`` of each block's
  unbiased variance (a spread measure robust to a trend in the history)."""
  width = norms.shape[0] // blocks
  srt = jnp.sort(norms)[:blocks * width].reshape(blocks, width)
  return jnp.mean(jnp.var(srt, axis=1, ddof=1))


def mean_relative_change(history: jax.Array, observed: jax.Array) -> jax.Array:
  """Mean of ``(h[i+1] - h[i]) / h[i]`` over consecutive observed entries.

  Only pairs whose both entries were observed and whose denominator is
  positive count; 0 when there is none.
  """
  size = history.shape[0]
  prev, nxt = history[:-1], history[1:]
  idx = jnp.arange(size - 1)
  valid = (idx >= size - observed) & (prev > 0) & jnp.isfinite(prev) & (
      jnp.isfinite(nxt))
  rel = jnp.where(valid, (nxt - prev) / jnp.where(valid, prev, 1.0), 0.0)
  n = jnp.sum(valid)
  return jnp.where(n > 0, jnp.sum(rel) / jnp.maximum(n, 1), 0.0)


def recompute_adaptive(
    window: int = 50,
    blocks: int = 5,
    max_fraction: float = 0.8,
    gains: Sequence[float] = (0.13, 0.13),
    init_rate: float = 1.0,
    warmup_steps: Optional[int] = None,
) -> ReuseSchedule:
  """ARSAM's adaptive sampling: a recompute quota per window, adapted to the
  trend of the PSF.

  The ARSAM paper's exact rule could not be read here; this is the rule of the
  same authors' public code for its predecessor vSAM (github.com/ajiaaa/vSAM),
  which the paper summarises as sampling the PSF when its variation grows.
  Steps are grouped in windows of ``window`` steps after ``warmup_steps``
  steps that all recompute. A window has a quota ``floor(rate)`` of
  recomputes: each step recomputes with probability ``rate / window`` while
  the quota is not met, and the last steps of the window are forced when the
  quota could not be met otherwise, so every window recomputes exactly
  ``floor(rate)`` times. At the end of the warm-up and of every window::

    rate <- clip(rate * (1 + gains[0] * r1 + gains[1] * r2), 1,
                 floor(max_fraction * window))

  ``r1``: the mean relative change between consecutive recomputes of
  ``||psf|| / ||g||`` over the last ``window`` recomputes; ``r2``: the same
  for the block-wise variance of ``||psf||`` (:func:`block_variance` with
  ``blocks`` blocks); both clipped to ``[-1, 1]``. A growing PSF, or a PSF
  whose spread grows, raises the recompute rate.

  Decisions of this implementation where the code leaves room: the
  probability draw is ``uniform(fold_in(key, t)) < rate / window``; windows
  are aligned to the end of the warm-up and the first window starts at
  ``init_rate`` updated once by the warm-up's statistics (vSAM's first
  window after warm-up never samples); relative changes skip pairs with a
  zero denominator or an unobserved entry (vSAM's buffers start at zero and
  its 3-epoch warm-up fills them); the statistics cover the engine's
  ``stats_on`` leaves (vSAM: the last few parameter tensors).

  Args:
    window: steps per window (vSAM: 50), >= 2.
    blocks: blocks of the variance estimate (vSAM: 5); ``window // blocks``
      must be >= 2.
    max_fraction: largest fraction of recomputing steps (vSAM: 0.8).
    gains: ``(a1, a2)``, the weights of the two trends (vSAM's training
      script: 0.13 each).
    init_rate: the initial quota, in ``[1, max_fraction * window]``
      (vSAM: 1).
    warmup_steps: steps of plain SAM first (vSAM: 3 epochs). Default
      ``window``: the fewest that fill the statistics' history.

  Returns:
    A :class:`ReuseSchedule` with :class:`AdaptiveScheduleState`.

  References:
    Deng and Pang, `Adaptively Sampling-Reusing-Mixing Decomposed Gradients
    to Speed Up Sharpness Aware Minimization
    <https://arxiv.org/abs/2510.03763>`_, 2025.
  """
  window = args_lib.check_int(window, "window", 2)
  blocks = args_lib.check_int(blocks, "blocks", 1)
  if window // blocks < 2:
    raise ValueError(f"window // blocks must be >= 2 (each block needs two "
                     f"entries for a variance), got window={window}, "
                     f"blocks={blocks}.")
  if not 0.0 < float(max_fraction) <= 1.0:
    raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}.")
  max_rate = int(window * float(max_fraction))
  if max_rate < 1:
    raise ValueError(f"max_fraction * window must be >= 1, got "
                     f"{max_fraction} * {window}.")
  gains = tuple(float(a) for a in gains)
  if len(gains) != 2:
    raise ValueError(f"gains must be a pair (a1, a2), got {gains}.")
  if not 1.0 <= float(init_rate) <= max_rate:
    raise ValueError(f"init_rate must be in [1, {max_rate}] "
                     f"(= floor(max_fraction * window)), got {init_rate}.")
  warmup = window if warmup_steps is None else args_lib.check_int(
      warmup_steps, "warmup_steps", 0)

  def init(key):
    z = jnp.zeros([window], jnp.float32)
    return AdaptiveScheduleState(
        count=jnp.zeros([], jnp.int32), key=args_lib.as_key(key),
        rate=jnp.asarray(init_rate, jnp.float32),
        done=jnp.zeros([], jnp.int32), norms=z, ratios=z, variances=z,
        observed=jnp.zeros([], jnp.int32))

  def decide(state):
    since = state.count - warmup
    pos = jnp.mod(jnp.maximum(since, 0), window)
    quota = jnp.floor(state.rate).astype(jnp.int32)
    u = jax.random.uniform(jax.random.fold_in(state.key, state.count))
    sampled = (state.done < quota) & (u < state.rate / window)
    forced = (window - pos) <= (quota - state.done)
    return (since < 0) | sampled | forced

  def update(state, recomputed, stats):
    recomputed = jnp.asarray(recomputed)
    norm = jnp.asarray(stats.second_order_norm, jnp.float32)
    ratio = norm * perturb_lib.safe_inverse(
        jnp.asarray(stats.grad_norm, jnp.float32))
    # A non-finite measurement (e.g. a NaN gradient) is not recorded.
    seen = recomputed & jnp.isfinite(norm) & jnp.isfinite(ratio)
    norms = _push(state.norms, norm)
    ratios = _push(state.ratios, ratio)
    variances = _push(state.variances, block_variance(norms, blocks))
    keep = lambda new, old: jnp.where(seen, new, old)
    norms, ratios = keep(norms, state.norms), keep(ratios, state.ratios)
    variances = keep(variances, state.variances)
    observed = _increment_where(seen, state.observed)
    done = _increment_where(recomputed, state.done)
    count = optax.safe_increment(state.count)
    boundary = (count >= warmup) & (jnp.mod(count - warmup, window) == 0)
    r1 = jnp.clip(mean_relative_change(ratios, observed), -1.0, 1.0)
    r2 = jnp.clip(mean_relative_change(variances, observed), -1.0, 1.0)
    new_rate = jnp.clip(state.rate * (1.0 + gains[0] * r1 + gains[1] * r2),
                        1.0, float(max_rate))
    return AdaptiveScheduleState(
        count=count, key=state.key,
        rate=jnp.where(boundary, new_rate, state.rate).astype(jnp.float32),
        done=jnp.where(boundary, 0, done).astype(jnp.int32),
        norms=norms, ratios=ratios, variances=variances, observed=observed)

  return ReuseSchedule(init, decide, update)


# ---------------------------------------------------------------------------
# Mixers.


class Mixer(NamedTuple):
  """What a recompute step stores, and how a reuse step uses it.

  Attributes:
    store: ``store(g, g_sam) -> stored``, on recompute steps, with the
      (averaged) SGD and SAM gradients; ``stored`` is shaped like the params.
    mix: ``mix(g, stored, age) -> descent`` on reuse steps; ``age`` (int32)
      is the number of steps since ``stored`` was computed (1 on the first
      reuse step).
  """
  store: Callable[[PyTree, PyTree], PyTree]
  mix: Callable[[PyTree, PyTree, jax.Array], PyTree]


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def psf_mixer(decay: float = 0.7, horizon: Optional[int] = 6) -> Mixer:
  """ARSAM's mixing: ``g + decay**age * psf`` with ``psf = g_sam - g``.

  The stored PSF is the whole difference between SAM's and SGD's gradient
  (to first order ``rho H g / ||g||``, the Hessian projected along ``g``).
  Its weight decays geometrically with its age and drops to 0 after
  ``horizon`` reuse steps (the predecessor vSAM's code: 0.7 per step for 6
  steps, then plain SGD until the next recompute).

  Args:
    decay: the per-step factor, >= 0 (1 with ``horizon=None``: reuse the PSF
      unchanged until the next recompute).
    horizon: the largest age that still mixes the PSF in, or None for no
      limit.

  Returns:
    A :class:`Mixer`.
  """
  decay = args_lib.check_number(decay, "decay", 0.0)
  if horizon is not None:
    horizon = args_lib.check_int(horizon, "horizon", 0)

  def store(g, g_sam):
    return jax.tree.map(lambda a, b: (_f32(b) - _f32(a)).astype(b.dtype),
                        g, g_sam)

  def mix(g, stored, age):
    coef = jnp.power(_f32(decay), _f32(age))
    if horizon is not None:
      coef = jnp.where(age <= horizon, coef, 0.0)
    return jax.tree.map(lambda a, s: (_f32(a) + coef * _f32(s)).astype(
        a.dtype), g, stored)

  return Mixer(store, mix)


def _norms_per_leaf(tree: PyTree, label_leaves: Optional[list[str]]
                    ) -> list[jax.Array]:
  """For each leaf, the L2 norm of its group (all leaves when no labels)."""
  leaves = jax.tree.leaves(tree)
  if label_leaves is None:
    n = perturb_lib.safe_norm(leaves)
    return [n] * len(leaves)
  by_group: dict[str, list[int]] = {}
  for i, lab in enumerate(label_leaves):
    by_group.setdefault(lab, []).append(i)
  out: list[Any] = [None] * len(leaves)
  for idx in by_group.values():
    n = perturb_lib.safe_norm([leaves[i] for i in idx])
    for i in idx:
      out[i] = n
  return out


def _dots_per_leaf(a: PyTree, b: PyTree, label_leaves: Optional[list[str]]
                   ) -> list[jax.Array]:
  """For each leaf, ``<a, b>`` summed over its group (float32)."""
  al, bl = jax.tree.leaves(a), jax.tree.leaves(b)
  parts = [jnp.sum(_f32(x) * _f32(y)) for x, y in zip(al, bl)]
  if label_leaves is None:
    total = sum(parts)
    return [total] * len(parts)
  sums: dict[str, Any] = {}
  for lab, p in zip(label_leaves, parts):
    sums[lab] = sums[lab] + p if lab in sums else p
  return [sums[lab] for lab in label_leaves]


def orthogonal_mixer(
    alpha: float = 0.7,
    *,
    per_layer: bool = False,
    labels: groups_lib.Labels = None,
) -> Mixer:
  """LookSAM's mixing: ``g + alpha * ||g|| / ||g_v|| * g_v``.

  On a recompute step the stored ``g_v`` is the component of ``g_sam``
  orthogonal to ``g``: ``g_v = g_sam - <g_sam, u> u`` with ``u = g / ||g||``
  (``g_v = g_sam`` when ``g = 0``). On a reuse step ``g_v`` is rescaled to
  ``alpha`` times the fresh gradient's norm and added to it (nothing is added
  when ``g_v = 0``).

  Args:
    alpha: the weight of the reused component (the paper's ``alpha``, 0.7 in
      its experiments), >= 0.
    per_layer: project and rescale per layer group instead of over all
      leaves. The paper writes global vectors (the default); the per-group
      variant (per parameter tensor with ``labels=lambda path:
      "/".join(path)``) is this library's choice, not the paper's: no
      official LookSAM code was released.
    labels: layer labels for ``per_layer`` (default: parent path).

  Returns:
    A :class:`Mixer`.

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  alpha = args_lib.check_number(alpha, "alpha", 0.0)

  def label_leaves(tree):
    if not per_layer:
      return None
    return jax.tree.leaves(groups_lib.layer_groups(tree, labels).labels)

  def store(g, g_sam):
    labs = label_leaves(g)
    inv = [perturb_lib.safe_inverse(n) for n in _norms_per_leaf(g, labs)]
    u = jax.tree.unflatten(jax.tree.structure(g), [
        _f32(x) * i for x, i in zip(jax.tree.leaves(g), inv)])
    dots = _dots_per_leaf(g_sam, u, labs)
    out = [(_f32(s) - d * uu).astype(s.dtype) for s, d, uu in zip(
        jax.tree.leaves(g_sam), dots, jax.tree.leaves(u))]
    return jax.tree.unflatten(jax.tree.structure(g_sam), out)

  def mix(g, stored, age):
    del age
    labs = label_leaves(g)
    gn = _norms_per_leaf(g, labs)
    vn = _norms_per_leaf(stored, labs)
    # The scale is guarded on its own (0 if not finite): XLA's constant
    # folding can turn the norm of a compile-time-constant tiny gradient
    # into NaN, and that must not leak into the update.
    scales = [alpha * n * perturb_lib.safe_inverse(m) for n, m in zip(gn, vn)]
    scales = [jnp.where(jnp.isfinite(c), c, 0.0) for c in scales]
    out = [(_f32(a) + c * _f32(v)).astype(a.dtype) for a, v, c in zip(
        jax.tree.leaves(g), jax.tree.leaves(stored), scales)]
    return jax.tree.unflatten(jax.tree.structure(g), out)

  return Mixer(store, mix)


# ---------------------------------------------------------------------------
# The engine.


class ReuseState(NamedTuple):
  """State of :func:`reuse_sam` (and of :func:`optax_sam.arsam`,
  :func:`optax_sam.looksam`).

  Attributes:
    opt_state: the base optimizer's state.
    perturbation_state: the perturbation transform's state (advanced every
      step, so a ``rho`` schedule follows the step count).
    schedule: the schedule's state (holds its PRNG key).
    stored: the stored component (PSF or ``g_v``), shaped like the params.
    age: int32, steps since ``stored`` was computed (0 after a recompute).
    count: int32, steps taken.
    recomputes: int32, steps that recomputed SAM's gradient (two passes);
      ``recomputes / count`` is the recompute fraction (cost
      ``1 + recomputes / count`` SGD gradients per step).
    recomputed: bool, whether the last step recomputed.
    next_recompute: bool, the schedule's decision for the next step (what
      :class:`optax_sam.SpecializedStep` reads to run the one branch as its
      own program, without ``lax.cond``).
  """
  opt_state: optax.OptState
  perturbation_state: optax.OptState
  schedule: Any
  stored: PyTree
  age: jax.Array
  count: jax.Array
  recomputes: jax.Array
  recomputed: jax.Array
  next_recompute: jax.Array


def recompute_fraction(state: ReuseState) -> jax.Array:
  """Fraction of the steps so far that recomputed SAM's gradient."""
  return state.recomputes / jnp.maximum(state.count, 1)


def _restrict_leaves(tree: PyTree, mask: PyTree) -> list[Any]:
  return [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask))
          if m]


def reuse_sam(
    optimizer: optax.GradientTransformation,
    schedule: ReuseSchedule,
    mixer: Mixer,
    *,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    perturbation: Optional[optax.GradientTransformation] = None,
    perturb: groups_lib.MaskOrFn = None,
    stats_on: groups_lib.MaskOrFn = None,
    seed: args_lib.SeedOrKey = 0,
    axis_name: Optional[str] = None,
    sync_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SAM that recomputes its second-order part only on scheduled steps.

  One step:

  1. clean pass ``g = grad L(w)`` (every leaf; outside any branch, so it runs
     once); ``g_bar``: ``g`` averaged over ``axis_name``;
  2. the schedule's predicate (forced True on the first step, when nothing
     is stored yet, unless the schedule's decision is static);
  3. ``lax.cond`` on the predicate:

     * recompute: ``eps = perturbation(g)`` (local ``g``, or ``g_bar`` with
       ``sync_ascent``); ``g_sam = grad L(w + eps)`` averaged over
       ``axis_name``; store ``mixer.store(g_bar, g_sam)``; descend along
       ``g_sam`` (so recomputing every step is SAM exactly);
     * reuse: descend along ``mixer.mix(g_bar, stored, age)``;

  4. ``updates = optimizer.update(descent, opt_state, w)``; the schedule
     sees the predicate and :class:`ReuseStats`.

  Args:
    optimizer: the base optimizer (any optax transformation, a chain, an
      ``inject_hyperparams`` optimizer or ``optax.MultiSteps``).
    schedule: a :class:`ReuseSchedule`.
    mixer: a :class:`Mixer`.
    rho: SAM radius (> 0) or schedule; ignored when ``perturbation`` is
      given.
    perturbation: the ascent transform; default
      ``optax_sam.sam_perturbation(rho)``.
    perturb: static subset of leaves to perturb (mask or ``params -> mask``).
    stats_on: leaves whose norms feed the schedule's statistics (mask or
      ``params -> mask``); default every leaf.
    seed: seed of the schedule's PRNG key (identical on every device): an
      int, a raw ``uint32`` key or a typed key.
    axis_name: mapped axis to average the gradients over.
    sync_ascent: also average the ascent gradient (default: m-sharpness,
      each device perturbs along its own shard's gradient).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`ReuseState`.
    Its ``update`` takes ``grad_fn`` (C1) or is driven by
    :func:`optax_sam.make_update` (C2); other keyword arguments go to the
    base optimizer.
  """
  optimizer = sam_lib.as_extra_args(optimizer)
  if perturbation is None:
    perturbation = perturb_lib.sam_perturbation(rho)
  if not isinstance(schedule, ReuseSchedule):
    raise TypeError(f"schedule must be an optax_sam.ReuseSchedule (e.g. "
                    f"optax_sam.recompute_every(5)), got {schedule!r}.")
  if not isinstance(mixer, Mixer):
    raise TypeError(f"mixer must be an optax_sam.Mixer, got {mixer!r}.")
  if sync_ascent and axis_name is None:
    raise ValueError("sync_ascent=True needs an axis_name.")

  def init_fn(params):
    return ReuseState(
        opt_state=optimizer.init(params),
        perturbation_state=perturbation.init(params),
        schedule=schedule.init(args_lib.as_key(seed)),
        stored=jax.tree.map(jnp.zeros_like, params),
        age=jnp.zeros([], jnp.int32),
        count=jnp.zeros([], jnp.int32),
        recomputes=jnp.zeros([], jnp.int32),
        recomputed=jnp.zeros([], jnp.bool_),
        next_recompute=jnp.ones([], jnp.bool_))

  def decision(sched_state, recomputes):
    pred = schedule.decide(sched_state)
    if isinstance(pred, (bool, np.bool_)):
      return pred
    return jnp.logical_or(jnp.asarray(pred, jnp.bool_), recomputes == 0)

  def update_fn(updates, state, params=None, *, grad_fn=None,
                static_recompute=None, **extra_args):
    if params is None:
      raise ValueError("this transformation needs params: call "
                       "tx.update(grads, state, params, grad_fn=...).")
    oracle = step_lib.as_oracle(updates, grad_fn)
    mask = groups_lib.resolve_mask(perturb, params, what="perturb")
    stats_mask = groups_lib.resolve_mask(stats_on, params, what="stats_on")
    local = step_lib.as_local(params, axis_name)

    # The clean pass, needed by both branches: computed once, out of the cond.
    g = oracle.clean(local)
    g_bar = step_lib.pmean_where(g, None, axis_name)

    def recompute(pstate):
      g_asc = step_lib.restrict(g_bar if sync_ascent else g, mask)
      eps, pstate = perturbation.update(g_asc, pstate, params)
      g_sam = oracle.perturbed(step_lib.add_where(local, eps, mask), 0)
      g_sam = step_lib.pmean_where(g_sam, None, axis_name)
      stored = jax.tree.map(lambda s, x: x.astype(s.dtype), state.stored,
                            mixer.store(g_bar, g_sam))
      diff = [_f32(b) - _f32(a) for a, b in zip(
          _restrict_leaves(g_bar, stats_mask),
          _restrict_leaves(g_sam, stats_mask))]
      stats = ReuseStats(
          perturb_lib.safe_norm(diff),
          perturb_lib.safe_norm(_restrict_leaves(g_bar, stats_mask)))
      return g_sam, stored, pstate, stats, jnp.zeros([], jnp.int32)

    def reuse(pstate):
      # Advances the perturbation's state (e.g. a rho schedule's count); the
      # unused perturbation itself is dropped by XLA.
      _, pstate = perturbation.update(step_lib.restrict(g, mask), pstate,
                                      params)
      age = optax.safe_increment(state.age)
      descent = mixer.mix(g_bar, state.stored, age)
      descent = jax.tree.map(lambda a, d: d.astype(a.dtype), g_bar, descent)
      zero = jnp.zeros([], jnp.float32)
      return descent, state.stored, pstate, ReuseStats(zero, zero), age

    if static_recompute is not None:  # decided on the host (SpecializedStep)
      pred = bool(static_recompute)
    else:
      pred = decision(state.schedule, state.recomputes)
      if not isinstance(pred, (bool, np.bool_)):
        # The same decision, taken at the end of the last step and kept in
        # the state: the one predicate SpecializedStep and this cond share.
        pred = state.next_recompute
    if isinstance(pred, (bool, np.bool_)):
      branch = recompute if pred else reuse
      out = branch(state.perturbation_state)
      pred = jnp.asarray(bool(pred))
    else:
      with oracle.conditional():
        out = jax.lax.cond(pred, recompute, reuse, state.perturbation_state)
    descent, stored, pstate, stats, age = out
    sched_state = schedule.update(state.schedule, pred, stats)
    recomputes = _increment_where(pred, state.recomputes)
    new_updates, opt_state = optimizer.update(descent, state.opt_state,
                                              params, **extra_args)
    return new_updates, ReuseState(
        opt_state=opt_state, perturbation_state=pstate, schedule=sched_state,
        stored=stored, age=age,
        count=optax.safe_increment(state.count),
        recomputes=recomputes,
        recomputed=pred,
        next_recompute=jnp.asarray(decision(sched_state, recomputes),
                                   jnp.bool_))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
