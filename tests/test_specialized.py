"""SpecializedStep drives reuse methods (ARSAM, LookSAM) without lax.cond."""

import jax
import numpy as np
import optax
import pytest

import optax_sam
from _util import selective, assert_trees_close, jax_loss, setup, to_jax


@pytest.mark.parametrize("make", [
    lambda: optax_sam.looksam(optax.sgd(0.1, momentum=0.9), every=3),
    lambda: optax_sam.arsam(optax.sgd(0.1, momentum=0.9), schedule=(
        optax_sam.schedules.recompute_with_probability(0.4)), seed=1),
], ids=["looksam", "arsam_bernoulli"])
def test_specialized_equals_cond(make):
  p, x, y = setup(0)
  tx = make()
  params = to_jax(p)
  ref = jax.jit(optax_sam.make_update(tx, jax_loss))
  spec = optax_sam.SpecializedStep(tx, jax_loss)
  a = (params, tx.init(params))
  b = (params, tx.init(params))
  flags = []
  for _ in range(9):
    _, u, s = ref(*a, x, y)
    a = (optax.apply_updates(a[0], u), s)
    _, u2, s2 = spec(*b, x, y)
    b = (optax.apply_updates(b[0], u2), s2)
    assert bool(s.recomputed) == bool(s2.recomputed)
    flags.append(bool(s.recomputed))
    assert_trees_close(a[0], b[0], rtol=1e-6, atol=1e-7)
  assert len(set(flags)) == 2, "both branches should run"
  assert spec.compilations == 2


def _selective(executor, policy):
  return selective(optax.sgd(0.1, momentum=0.9), policy,
                                 executor=executor)


def test_selection_read_from_the_state_every_step():
  """No policy to repeat: a selection changing every step is followed."""
  p, x, y = setup(0)
  params = to_jax(p)
  policy = optax_sam.policies.random_k(1)
  ref_tx, tx = _selective("dense", policy), _selective("specialize", policy)
  ref = jax.jit(optax_sam.make_update(ref_tx, jax_loss))
  spec = optax_sam.SpecializedStep(tx, jax_loss)
  a = (params, ref_tx.init(params))
  b = (params, tx.init(params))
  sels = set()
  for _ in range(8):
    _, u, s = ref(*a, x, y)
    a = (optax.apply_updates(a[0], u), s)
    _, u2, s2 = spec(*b, x, y)
    b = (optax.apply_updates(b[0], u2), s2)
    np.testing.assert_array_equal(s.last_selection, s2.last_selection)
    sels.add(tuple(np.asarray(s2.last_selection).tolist()))
    assert_trees_close(a[0], b[0], rtol=1e-6, atol=1e-7)
  assert len(sels) == 2 and spec.compilations == 2


def test_resumes_from_a_restored_state():
  p, x, y = setup(0)
  params = to_jax(p)
  tx = optax_sam.layerwise_sam(optax.sgd(0.1), num_layers=1, every=3,
                               executor="specialize")
  run = optax_sam.SpecializedStep(tx, jax_loss)
  state, trace = tx.init(params), []
  saved = None
  for t in range(7):
    if t == 4:
      saved = (params, jax.tree.map(np.asarray, state))
    _, u, state = run(params, state, x, y)
    params = optax.apply_updates(params, u)
    trace.append(params)
  # A fresh helper (as after a restart) continues from the checkpoint.
  params2, state2 = saved[0], jax.tree.map(jax.numpy.asarray, saved[1])
  run2 = optax_sam.SpecializedStep(tx, jax_loss)
  for t in range(4, 7):
    _, u, state2 = run2(params2, state2, x, y)
    params2 = optax.apply_updates(params2, u)
    assert_trees_close(params2, trace[t], rtol=0, atol=0)


def test_forwards_extra_arguments_to_the_base_optimizer():
  p, x, y = setup(0)
  params = to_jax(p)

  def scaled_sgd():
    def update(updates, state, params=None, *, lr_scale, **extra):
      del params, extra
      return jax.tree.map(lambda g: -0.1 * lr_scale * g, updates), state
    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(), update)

  tx = optax_sam.arsam(scaled_sgd(), rho=0.05)
  spec = optax_sam.SpecializedStep(tx, jax_loss)
  ref = jax.jit(optax_sam.make_update(tx, jax_loss))
  _, u, _ = spec(params, tx.init(params), x, y, lr_scale=2.0)
  _, u_ref, _ = ref(params, tx.init(params), x, y, lr_scale=2.0)
  assert_trees_close(u, u_ref, rtol=1e-6, atol=1e-7)


def test_uncovered_selection_raises_a_clear_error():
  p, x, y = setup(0)
  params = to_jax(p)
  tx = _selective("specialize", optax_sam.policies.fixed([1]))
  step = jax.jit(lambda pr, s: optax_sam.make_update(tx, jax_loss)(
      pr, s, x, y, static_selection=(True, False)))
  _, _, state = step(params, tx.init(params))
  assert int(state.branch) == -1
  with pytest.raises(ValueError, match="not covered"):
    optax_sam.SpecializedStep(tx, jax_loss)(params, state, x, y)


def test_policy_argument_is_deprecated():
  tx = _selective("specialize", optax_sam.policies.fixed([1]))
  with pytest.warns(DeprecationWarning):
    optax_sam.SpecializedStep(tx, jax_loss,
                              policy=optax_sam.policies.fixed([1]))
