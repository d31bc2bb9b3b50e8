"""Reliability (issue 15): every method reports a non-finite step in its
state (``finite``), works with ``optax.apply_if_finite`` as its base
optimizer in C1 and C2 (and as a wrapper in C1; C2 refuses it with a clear
error), and stays finite with huge (1e30) gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from optax_sam import policies, schedules
from _util import jax_loss, setup, to_jax

FACTORIES = {
    "sam": lambda o: optax_sam.sam(o),
    "asam": lambda o: optax_sam.asam(o),
    "layerwise_sam": lambda o: optax_sam.layerwise_sam(o, num_layers=1,
                                                      every=1),
    "arsam": lambda o: optax_sam.arsam(
        o, schedule=schedules.recompute_every(2)),
    "looksam": lambda o: optax_sam.looksam(o, every=2),
    "slsam": lambda o: optax_sam.slsam(o, executor="dense"),
    "sharpness_aware": lambda o: optax_sam.sharpness_aware(
        o, policy=policies.top_k(1), schedule=schedules.recompute_every(2)),
    "plain": lambda o: optax_sam.plain(o),
}
NAMES = sorted(FACTORIES)


def _problem():
  p, x, y = setup()
  return to_jax(p), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _nan_batch(x):
  return x.at[0, 0].set(jnp.nan)


def _step(tx, path):
  if path == "c2":
    return optax_sam.make_update(tx, jax_loss)

  def step(p, st, xb, yb):
    g = jax.grad(jax_loss)(p, xb, yb)
    u, st = tx.update(g, st, p, grad_fn=lambda q, i: jax.grad(jax_loss)(
        q, xb, yb))
    return (None, None), u, st
  return step


def _all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x))))
             for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def _inner(state):
  """The SAM/plain state inside optax.apply_if_finite's, or itself."""
  return state.inner_state if isinstance(
      state, optax.ApplyIfFiniteState) else state


@pytest.mark.parametrize("name", NAMES)
def test_finite_flag_is_a_checkpointable_field(name):
  p, _, _ = _problem()
  st = FACTORIES[name](optax.sgd(0.1)).init(p)
  assert st.finite.dtype == jnp.bool_ and st.finite.shape == ()
  assert bool(st.finite)
  leaves, treedef = jax.tree.flatten(st)
  again = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  assert type(again) is type(st) and bool(again.finite)


@pytest.mark.parametrize("path", ["c1", "c2"])
@pytest.mark.parametrize("name", NAMES)
def test_finite_flag_reports_nan_batch(name, path):
  p, x, y = _problem()
  tx = FACTORIES[name](optax.sgd(0.1, momentum=0.9))
  step = jax.jit(_step(tx, path))
  st = tx.init(p)
  _, u, st = step(p, st, x, y)
  assert bool(st.finite) and _all_finite(u)
  _, u, st = step(p, st, _nan_batch(x), y)
  assert not bool(st.finite)  # reported, as plain optax would propagate it
  assert not _all_finite(u)


@pytest.mark.parametrize("path", ["c1", "c2"])
@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_as_base_optimizer_skips_nan_batch(name, path):
  p, x, y = _problem()
  tx = FACTORIES[name](optax.apply_if_finite(optax.sgd(0.1, momentum=0.9),
                                             3))
  step = jax.jit(_step(tx, path))
  st = tx.init(p)
  losses = [float(jax_loss(p, x, y))]
  for s in range(6):
    bad = s == 2
    _, u, st = step(p, st, _nan_batch(x) if bad else x, y)
    new_p = optax.apply_updates(p, u)
    assert bool(st.finite) is not bad
    assert int(st.opt_state.notfinite_count) == int(bad)
    if bad:
      jax.tree.map(np.testing.assert_array_equal, new_p, p)
    else:
      assert not all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(new_p), jax.tree.leaves(p)))
    p = new_p
    assert _all_finite(p) and _all_finite(st)
    losses.append(float(jax_loss(p, x, y)))
  assert losses[-1] < losses[0]


def test_stored_component_not_poisoned_by_nan_step():
  # ARSAM recomputes at steps 0, 2, 4: the NaN batch at step 2 is a
  # recompute; its g_sam - g is not stored, so the reuse step 3 descends
  # along a finite gradient.
  p, x, y = _problem()
  tx = optax_sam.arsam(optax.apply_if_finite(optax.sgd(0.1), 3),
                       schedule=schedules.recompute_every(2))
  step = jax.jit(_step(tx, "c2"))
  st = tx.init(p)
  for s in range(4):
    _, u, st = step(p, st, _nan_batch(x) if s == 2 else x, y)
    assert bool(st.recomputed) == (s % 2 == 0)
    assert _all_finite(st.stored)
    assert bool(st.finite) == (s != 2)
    p = optax.apply_updates(p, u)
  assert _all_finite(p)


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_as_wrapper_c1(name):
  p, x, y = _problem()
  tx = optax.apply_if_finite(FACTORIES[name](optax.sgd(0.1)), 3)
  step = jax.jit(_step(tx, "c1"))
  st = tx.init(p)
  _, u, st = step(p, st, _nan_batch(x), y)
  assert int(st.notfinite_count) == 1 and not bool(st.last_finite)
  jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0), u)
  before = jax.tree.leaves(tx.init(p).inner_state)
  for a, b in zip(jax.tree.leaves(st.inner_state), before):
    np.testing.assert_array_equal(a, b)  # the inner state did not move
  _, u, st = step(p, st, x, y)
  assert bool(st.last_finite) and bool(_inner(st).finite) and _all_finite(u)
  assert not all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(u))


def test_apply_if_finite_wrapper_misses_nan_in_perturbed_pass_only():
  """The documented limit of the wrapper form: it tests the gradient it is
  given (the clean pass) only. The base-optimizer form tests the descent
  gradient, so it skips the step."""
  p, _, _ = _problem()
  g = jax.tree.map(jnp.ones_like, p)
  nan = lambda q, i: jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), q)
  wrapped = optax.apply_if_finite(optax_sam.sam(optax.sgd(0.1)), 3)
  u, st = wrapped.update(g, wrapped.init(p), p, grad_fn=nan)
  assert bool(st.last_finite) and not _all_finite(u)
  assert not bool(st.inner_state.finite)  # but the method reports it
  based = optax_sam.sam(optax.apply_if_finite(optax.sgd(0.1), 3))
  u, st = based.update(g, based.init(p), p, grad_fn=nan)
  assert _all_finite(u) and not bool(st.finite)
  assert int(st.opt_state.notfinite_count) == 1


def test_apply_if_finite_as_wrapper_c2_is_a_clear_error():
  p, x, y = _problem()
  tx = optax.apply_if_finite(optax_sam.sam(optax.sgd(0.1)), 3)
  step = optax_sam.make_update(tx, jax_loss)
  with pytest.raises(TypeError, match="base optimizer"):
    step(p, tx.init(p), x, y)


# --------------------------------------------------------- huge gradients


def test_asam_huge_gradient_does_not_overflow():
  # |w| |g| = 1e40 overflows float32 (and |w| |g| > 65504 float16); ASAM's
  # eps is invariant to the scale of g, so it must equal the eps of the same
  # direction at scale 1.
  cases = [
      ({"a": {"w": jnp.full((3, 4), 1e10)}, "c": {"w": jnp.full((2,), 3.0)}},
       {"a": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)},
        "c": {"w": jnp.asarray([0.5, -2.0])}}, (1e30, 1e-30), 1e-5),
      ({"b": {"w": jnp.asarray([2.0, -3.0], jnp.float16)}},
       {"b": {"w": jnp.asarray([0.5, 1.0], jnp.float16)}}, (6e4,), 2e-3),
  ]
  for p, direction, scales, rtol in cases:
    for per_layer in (False, True):
      tx = optax_sam.asam_perturbation(0.5, per_layer=per_layer)
      ref, _ = tx.update(direction, tx.init(p), p)
      assert _all_finite(ref)
      for scale in scales:
        g = jax.tree.map(lambda d: (d.astype(jnp.float32) * scale).astype(
            d.dtype), direction)
        eps, _ = tx.update(g, tx.init(p), p)
        assert _all_finite(eps), (per_layer, scale)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32),
            rtol=rtol), eps, ref)


HUGE = {
    "asam": lambda o: optax_sam.asam(o),
    "layerwise_sam": lambda o: optax_sam.layerwise_sam(o, num_layers=1,
                                                      every=1, ema=0.5),
    "arsam": lambda o: optax_sam.arsam(
        o, schedule=schedules.recompute_adaptive(window=4, blocks=2,
                                                 warmup_steps=2)),
    "bandit": lambda o: optax_sam.sharpness_aware(
        o, policy=policies.bandit(0.5)),
    "slsam": lambda o: optax_sam.slsam(o, executor="dense"),
    "looksam": lambda o: optax_sam.looksam(o, every=2),
}


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_gradients_keep_state_finite(name):
  """1e30 gradients (|w| up to 1e10): finite updates, every float of the
  state finite, except a top_k policy's score of a group never observed
  (NaN by design: a squared norm of 1e60 overflows float32 and is not a
  measurement), and learning resumes when the gradients are normal."""
  p = {"a": {"w": jnp.full((3, 4), 1e10), "b": jnp.ones((4,))},
       "c": {"w": jnp.full((4, 2), 0.5), "b": jnp.zeros((2,))}}
  tx = HUGE[name](optax.sgd(1e-32))
  st = tx.init(p)
  huge = jax.tree.map(lambda a: jnp.full_like(a, 1e30), p)
  for _ in range(6):
    u, st = tx.update(huge, st, p, grad_fn=lambda q, i: huge)
    assert _all_finite(u) and bool(st.finite)
    p = optax.apply_updates(p, u)
  score_nan = None
  if name == "layerwise_sam":
    score_nan = np.isnan(np.asarray(st.policy.score))
    assert score_nan.all()  # never observed: no statistic was finite
    st_check = st._replace(policy=st.policy._replace(score=jnp.zeros(2)))
  else:
    st_check = st
  assert _all_finite(st_check)
  small = jax.tree.map(lambda a: jnp.full_like(a, 1.0), p)
  u, st = tx.update(small, st, p, grad_fn=lambda q, i: small)
  assert _all_finite(u) and _all_finite(st) and bool(st.finite)


def test_guide_recipe_runs():
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parent.parent
  text = (root / "docs" / "guide.md").read_text(encoding="utf-8")
  section = text.split("## Skipping bad steps", 1)[1].split("\n## ", 1)[0]
  block = section.split("```python\n", 1)[1].split("```", 1)[0]
  scope = {}
  exec(block, scope)  # pylint: disable=exec-used
  assert not bool(scope["state"].finite)
  jax.tree.map(lambda a: np.testing.assert_array_equal(a, 1.0),
               scope["params"])


def test_slsam_gated_params_with_a_none_leaf():
  # Found by test_properties: the gated executor counted params' None
  # subtree as a gate ("gates must have one entry per parameter leaf").
  # The same steps as without the None entry (same arms, same draws).
  def run(p):
    loss = lambda q, x: jnp.sum(jnp.tanh(x @ q["a"]["w"]) * q["b"])
    tx = optax_sam.slsam(optax.sgd(0.1), fraction=0.5, executor="gated")
    step = jax.jit(optax_sam.make_update(tx, loss))
    st, out = tx.init(p), []
    for _ in range(4):
      _, u, st = step(p, st, jnp.ones((4, 2)))
      assert bool(st.finite) and _all_finite(u)
      p = optax.apply_updates(p, u)
      out.append(p)
    return out
  p = {"a": {"w": jnp.ones((2, 3))}, "b": jnp.ones((3,))}
  with_none = run(dict(p, skip=None))
  for a, b in zip(with_none, run(p)):
    assert a["skip"] is None
    jax.tree.map(np.testing.assert_array_equal, {"a": a["a"], "b": a["b"]},
                 b)
