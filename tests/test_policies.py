"""Selection policies against hand-computed expectations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_sam
from optax_sam._src import policies


def _stats(sq_norms, observed=None, sizes=None):
  sq = jnp.asarray(sq_norms, jnp.float32)
  n = sq.shape[0]
  return policies.LayerStats(
      sq, jnp.ones(n, bool) if observed is None else jnp.asarray(observed),
      jnp.ones(n, jnp.float32) if sizes is None
      else jnp.asarray(sizes, jnp.float32))


def _sel(state):
  return np.asarray(state.selection).astype(int).tolist()


def test_top_k_mask_ties_and_nan():
  m = policies.top_k_mask(jnp.array([1.0, 3.0, 3.0, jnp.nan, 0.5]), 2)
  assert np.asarray(m).astype(int).tolist() == [0, 1, 1, 0, 0]
  # Ties: the deeper (output-side) group wins.
  m = policies.top_k_mask(jnp.array([2.0, 2.0, 2.0]), 1)
  assert np.asarray(m).astype(int).tolist() == [0, 0, 1]


def test_fixed():
  pol = optax_sam.policies.fixed([0, -1])
  s = pol.init(4, None)
  assert _sel(s) == [1, 0, 0, 1]
  s = pol.update(s, _stats([9.0, 1.0, 1.0, 0.0]))
  assert _sel(s) == [1, 0, 0, 1] and int(s.count) == 1
  with pytest.raises(ValueError, match="empty"):
    optax_sam.policies.fixed([]).init(3, None)
  with pytest.raises(ValueError, match="out of range"):
    optax_sam.policies.fixed([5]).init(3, None)


def test_top_k_by_norm_and_initial():
  pol = optax_sam.policies.top_k(2)
  s = pol.init(4, None)
  assert _sel(s) == [0, 0, 1, 1]  # output side before any statistic
  s = pol.update(s, _stats([1.0, 9.0, 4.0, 16.0]))  # norms 1, 3, 2, 4
  assert _sel(s) == [0, 1, 0, 1]
  s = pol.update(s, _stats([25.0, 0.0, 4.0, 1.0]))
  assert _sel(s) == [1, 0, 1, 0]


def test_top_k_rms_uses_sizes():
  pol = optax_sam.policies.top_k(1, statistic="rms")
  s = pol.init(2, None)
  # norms 10 and 4; per sqrt(size): 10/sqrt(100) = 1 < 4/sqrt(4) = 2.
  s = pol.update(s, _stats([100.0, 16.0], sizes=[100, 4]))
  assert _sel(s) == [0, 1]
  s = optax_sam.policies.top_k(1, statistic="norm").update(
      s, _stats([100.0, 16.0], sizes=[100, 4]))
  assert _sel(s) == [1, 0]


def test_top_k_ema_and_unobserved():
  ema = 0.5
  pol = optax_sam.policies.top_k(1, ema=ema)
  s = pol.init(3, None)
  s = pol.update(s, _stats([4.0, 1.0, 0.0]))  # first observation: 2, 1, 0
  np.testing.assert_allclose(s.score, [2.0, 1.0, 0.0])
  # Group 2 is not observed: its score is kept, not smoothed towards 0.
  s = pol.update(s, _stats([0.0, 25.0, 100.0], observed=[True, True, False]))
  np.testing.assert_allclose(s.score, [1.0, 3.0, 0.0])
  assert _sel(s) == [0, 1, 0]


def test_reselect_every_holds_choice():
  pol = optax_sam.policies.reselect_every(optax_sam.policies.top_k(1), 3)
  s = pol.init(3, None)
  seen = []
  for t in range(7):
    sq = [0.0, 0.0, 0.0]
    sq[t % 3] = 1.0  # the largest group moves every step
    s = pol.update(s, _stats(sq))
    seen.append(_sel(s))
  # Adopted only after steps 3 and 6 (count % 3 == 0), from those steps' data.
  assert seen[0] == seen[1] == [0, 0, 1]
  assert seen[2] == seen[3] == seen[4] == [0, 0, 1]  # t=2 -> group 2
  assert seen[5] == seen[6] == [0, 0, 1]  # t=5 -> group 2
  assert [pol.may_change(t) for t in range(7)] == [
      True, False, False, True, False, False, True]
  pol = optax_sam.policies.reselect_every(optax_sam.policies.top_k(1), 2)
  s = pol.init(3, None)
  s = pol.update(s, _stats([1.0, 0.0, 0.0]))
  assert _sel(s) == [0, 0, 1]
  s = pol.update(s, _stats([0.0, 1.0, 0.0]))
  assert _sel(s) == [0, 1, 0]


def test_random_k_deterministic_and_jittable():
  pol = optax_sam.policies.random_k(2)
  s0 = pol.init(5, jax.random.PRNGKey(3))
  upd = jax.jit(pol.update)
  a, b = s0, s0
  for _ in range(5):
    a, b = upd(a, _stats(np.ones(5))), pol.update(b, _stats(np.ones(5)))
    assert sum(_sel(a)) == 2 and _sel(a) == _sel(b)
  with pytest.raises(ValueError, match="k must be"):
    optax_sam.policies.random_k(6).init(5, None)


def test_bandit_update_matches_numpy():
  """The probabilities follow the numpy port of SL-SAM's get_prob (more
  cases in test_slsam.py)."""
  import reference  # pylint: disable=g-import-not-at-top
  fraction, eta = 0.5, 0.1
  pol = optax_sam.policies.bandit(fraction, eta)
  s = pol.init(4, jax.random.PRNGKey(0))
  np.testing.assert_allclose(s.score, [0.5] * 4)
  sq = np.array([4.0, 1.0, 0.25, 2.0], np.float32)
  for _ in range(4):
    drawn = np.nonzero(np.asarray(s.selection))[0]
    expected = reference.slsam_get_prob(s.score, fraction, eta,
                                        np.sqrt(sq[drawn]), drawn)
    s = pol.update(s, _stats(sq))
    np.testing.assert_allclose(s.score, expected, rtol=1e-5)
    assert sum(_sel(s)) >= 1
    np.testing.assert_allclose(np.sum(s.score), fraction * 4, rtol=1e-4)


def test_bandit_learns_large_norm_layer():
  pol = optax_sam.policies.bandit(0.25, eta=1.0, scale_invariant=True)
  s = pol.init(8, jax.random.PRNGKey(1))
  upd = jax.jit(pol.update)
  sq = np.array([0.1] * 7 + [10.0], np.float32)
  picks = np.zeros(8)
  for _ in range(200):
    s = upd(s, _stats(sq))
    picks += np.asarray(s.selection)
  assert np.argmax(np.asarray(s.score)) == 7
  assert picks[7] > 2 * picks[:7].mean()


def test_bandit_deterministic_given_key():
  pol = optax_sam.policies.bandit(0.3, eta=0.5)
  update = jax.jit(pol.update)  # eager, its draw loop took ~20 s
  runs = []
  for _ in range(2):
    s = pol.init(6, jax.random.PRNGKey(7))
    sels = []
    for t in range(5):
      s = update(s, _stats(np.arange(6.0) + t))
      sels.append(_sel(s))
    runs.append(sels)
  assert runs[0] == runs[1]


@pytest.mark.parametrize("make, match", [
    (lambda: optax_sam.policies.top_k(2, ema=1.0), "ema"),
    (lambda: optax_sam.policies.top_k(2, statistic="max"), "statistic"),
    (lambda: optax_sam.policies.reselect_every(optax_sam.policies.top_k(1),
                                               0), "every"),
    (lambda: optax_sam.policies.bandit(0.0), "fraction"),
    (lambda: optax_sam.policies.bandit(0.5, eta=-1.0), "eta"),
])
def test_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_top_k_larger_than_groups():
  with pytest.raises(ValueError, match="k must be"):
    optax_sam.policies.top_k(3).init(2, None)


@pytest.mark.parametrize("make", [
    lambda **kw: optax_sam.policies.bandit(0.3, eta=0.5, **kw),
    lambda **kw: optax_sam.policies.random_k(2, **kw),
], ids=["bandit", "random_k"])
def test_typed_and_raw_keys_give_the_same_draws(make):
  inits = {
      "seed": lambda: make(seed=7).init(6),
      "raw_seed": lambda: make(seed=jax.random.PRNGKey(7)).init(6),
      "typed_seed": lambda: make(seed=jax.random.key(7)).init(6),
      "raw_key": lambda: make().init(6, jax.random.PRNGKey(7)),
      "typed_key": lambda: make().init(6, jax.random.key(7)),
  }
  upd = jax.jit(make().update)
  runs = {}
  for name, init in inits.items():
    s = init()
    assert jax.dtypes.issubdtype(s.key.dtype, jax.dtypes.prng_key) == (
        name.startswith("typed"))
    sels = [_sel(s)]
    for t in range(5):
      s = upd(s, _stats(np.arange(6.0) + t))
      sels.append(_sel(s))
    runs[name] = sels
  assert len({str(r) for r in runs.values()}) == 1, runs


INT32_MAX = int(np.iinfo(np.int32).max)


@pytest.mark.parametrize("make", [
    lambda: optax_sam.policies.fixed([0]), lambda: optax_sam.policies.top_k(1),
    lambda: optax_sam.policies.reselect_every(optax_sam.policies.top_k(1), 2),
    lambda: optax_sam.policies.random_k(1),
    lambda: optax_sam.policies.bandit(0.5),
], ids=["fixed", "top_k", "reselect_every", "random_k", "bandit"])
def test_policy_counter_saturates_instead_of_wrapping(make):
  pol = make()
  s = pol.init(3, jax.random.PRNGKey(0))
  s = s._replace(count=jnp.asarray(INT32_MAX, jnp.int32))
  s = jax.jit(pol.update)(s, _stats([1.0, 4.0, 9.0]))
  assert int(s.count) == INT32_MAX
  assert sum(_sel(s)) >= 1


@pytest.mark.parametrize("schedule", [
    optax_sam.schedules.recompute_every(2),
    optax_sam.schedules.recompute_with_probability(0.5),
    optax_sam.schedules.recompute_adaptive(window=4, blocks=2, warmup_steps=0)],
    ids=["every", "probability", "adaptive"])
def test_schedule_counters_saturate_instead_of_wrapping(schedule):
  state = schedule.init(jax.random.PRNGKey(0))
  big = jnp.asarray(INT32_MAX, jnp.int32)
  fields = {f: big for f in ("count", "observed", "done")
            if hasattr(state, f)}
  state = state._replace(**fields)
  stats = optax_sam.schedules.ReuseStats(jnp.float32(1.0), jnp.float32(2.0))
  state = jax.jit(schedule.update)(state, jnp.asarray(True), stats)
  for f in fields:
    assert int(getattr(state, f)) == INT32_MAX, f
