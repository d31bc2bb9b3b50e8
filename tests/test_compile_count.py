"""No recompilation after the first step, for every method and path.

A training loop feeds each step's output state into the next step; if any
state leaf changes its shape, dtype, weak type or committedness between
steps (say an integer counter that comes back weakly typed, or a
hyperparameter that ``inject_hyperparams`` stores as a Python float at init
and as a float32 array after a step), ``jax.jit`` traces and compiles again,
silently, every time it changes. Each case runs ``STEPS`` steps of
``jax.jit(step)`` (C1: ``tx.update(grads, ..., grad_fn=...)``; C2:
``make_update``) with ``optax.apply_updates`` between them, as a user's loop
does (inputs committed to one device, as restored checkpoints are; the
programs are shared with test_memory and test_resume through
``_util.shared_step``), and requires, from the second step on, no backend
compilation and no tracing in the whole process (counted through
``jax.monitoring``, per step) and one entry in the jitted step's cache
(``_cache_size()``). ``test_the_detector_sees_a_recompilation`` checks that
both counters see a recompilation (a weakly typed state leaf, then a
changed batch shape) on exactly the steps that cause one.

Measured (jax 0.10.2, optax 0.2.8, CPU): no case recompiles.
"""

import collections
import contextlib

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_sam
from _util import (METHODS, committed, make_step, rolling_batches,
                   sgd_momentum, shared_step, to_jax, wide_mlp)

STEPS = 6
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def counting():
  """Counts backend compilations and jaxpr traces in the process."""
  counts = collections.Counter()

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event in (BACKEND_COMPILE, TRACE):
      counts[event] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# The base optimizer and hyperparameters around the methods (the schedule:
# METHODS["sharpness_aware"] has schedule=recompute_every(3), a random
# layer policy and a typed key).
VARIANTS = {
    # A rho schedule and a learning-rate schedule, both injected.
    "inject_rho_and_lr": lambda: optax.inject_hyperparams(optax_sam.sam)(
        optimizer=optax.inject_hyperparams(optax.sgd)(
            learning_rate=optax.linear_schedule(0.1, 0.01, 4)),
        rho=optax.linear_schedule(0.05, 0.1, 4)),
    # Integer arguments arrive as traced arrays.
    "inject_layerwise": lambda: optax.inject_hyperparams(
        optax_sam.layerwise_sam)(sgd_momentum(), rho=0.05, num_layers=1,
                                 every=2),
    "multisteps": lambda: optax_sam.sam(
        optax.MultiSteps(sgd_momentum(), every_k_schedule=2)),
    "chain_adamw": lambda: optax_sam.sam(optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-3))),
}
# C2 (the state is the same through C1), and C1 for the injected
# hyperparameters.
COMPOSED = [(name, "c2") for name in VARIANTS] + [("inject_rho_and_lr", "c1")]


def _run(tx, step, steps=STEPS, change=None):
  """Runs ``steps`` steps of ``step``; returns each step's counts (of the
  step and the ``apply_updates`` after it) and the jitted step's cache size.
  ``change(s, params, state, x, y)`` may alter a step's inputs (the
  detector's own test)."""
  p, x, y = wide_mlp(0)
  batches = rolling_batches(x, y)
  params = committed(to_jax(p))
  state = committed(tx.init(params))
  per_step = []
  for s in range(steps):
    (xb, yb), = batches(s)
    xb, yb = committed((jnp.asarray(xb), jnp.asarray(yb)))
    if change is not None:
      params, state, xb, yb = change(s, params, state, xb, yb)
    with counting() as counts:
      _, u, state = step(params, state, xb, yb)
      params = optax.apply_updates(params, u)
      jax.block_until_ready(params)
    per_step.append((counts[BACKEND_COMPILE], counts[TRACE]))
  return per_step, step._cache_size()  # pylint: disable=protected-access


def _assert_no_recompilation(tx, step):
  per_step, cache = _run(tx, step)
  assert all(c == (0, 0) for c in per_step[1:]), (
      f"(compilations, traces) of steps 1..{STEPS}: {per_step}")
  assert cache == 1, f"the jitted step holds {cache} programs"


@pytest.mark.parametrize("path", ["c1", "c2"])
@pytest.mark.parametrize("name", list(METHODS))
def test_no_recompilation(name, path):
  _assert_no_recompilation(*shared_step(name, path))


@pytest.mark.parametrize("name,path", COMPOSED)
def test_no_recompilation_composed(name, path):
  _assert_no_recompilation(*shared_step(name, path, VARIANTS[name]))


def test_the_detector_sees_a_recompilation():
  """A weakly typed state leaf (step 3) and a smaller batch (step 5) are
  each seen as one more compilation; the steps between are not."""
  tx = METHODS["sam"]()
  step = make_step(tx, "c2")  # a program of its own

  def change(s, params, state, xb, yb):
    if s == 2:  # the count as a weakly typed int32
      state = state._replace(count=committed(jnp.asarray(int(state.count))))
      assert state.count.aval.weak_type
    if s == 4:
      xb, yb = xb[:32], yb[:32]
    return params, state, xb, yb

  per_step, cache = _run(tx, step, change=change)
  compiled = [c >= 1 and t >= 1 for c, t in per_step]
  assert compiled == [True, False, True, False, True, False], per_step
  assert cache == 3
