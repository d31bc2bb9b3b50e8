"""The selection engine: selective_sam with every executor.

* against an independent numpy reference (the 2-layer MLP of reference.py)
  for a top-k policy, C1 and C2, with and without jit;
* every executor gives the same updates as the dense reference for the same
  selection sequence (deep MLP, changing selections, bandit + restricted
  descent);
* no recompilation after warm-up under ``lax.switch``; the specialising loop
  compiles once per distinct subset;
* compiled FLOPs per branch equal the static subset's;
* identical selections on 8 simulated devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import (selective, assert_trees_close, deep_mlp, flops, jax_loss,
                   run_steps, setup, to_jax)

LR, MOM, RHO = 0.1, 0.9, 0.05
LAYERS = ("hidden", "out")


def _run(tx, p, x, y, steps, path, jit):
  """Params after each step, the selection each step used, the last
  state."""
  out, states = run_steps(tx, to_jax(p), lambda s: [(x, y)], path, steps,
                          jit)
  return out, [np.asarray(s.last_selection) for s in states], states[-1]


@pytest.mark.parametrize("executor, restrict_descent, path, jit", [
    ("dense", False, "c2", True), ("switch", False, "c2", True),
    ("switch", False, "c2", False), ("switch", False, "c1", True),
    ("dense", True, "c2", True), ("switch", True, "c1", True)])
def test_matches_numpy_reference(executor, restrict_descent, path, jit):
  p, x, y = setup(0)
  tx = selective(
      optax.sgd(LR, momentum=MOM), optax_sam.policies.top_k(1), rho=RHO,
      executor=executor, restrict_descent=restrict_descent)
  got, sels, _ = _run(tx, p, x, y, 6, path, jit)
  want, want_sels = reference.run_top_k_momentum(
      p, x, y, 6, LR, MOM, RHO, 1, restrict_descent=restrict_descent)
  names = [tuple(n for n, f in zip(LAYERS, s) if f) for s in sels]
  assert names == want_sels
  if not restrict_descent:  # (restricted: unobserved layers keep no score)
    assert len(set(want_sels)) > 1, "the reference should change selection"
  for a, b in zip(got, want):
    assert_trees_close(a, b, rtol=2e-5, atol=2e-6)


def test_all_layers_equals_sam():
  p, x, y = setup(0)
  sel = selective(optax.sgd(LR, momentum=MOM),
                                optax_sam.policies.top_k(2), rho=RHO)
  full = optax_sam.sam(optax.sgd(LR, momentum=MOM), rho=RHO)
  a, _, _ = _run(sel, p, x, y, 4, "c2", True)
  b = []
  params, state = to_jax(p), full.init(to_jax(p))
  step = jax.jit(optax_sam.make_update(full, jax_loss))
  for _ in range(4):
    _, u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
    b.append(params)
  for u, v in zip(a, b):
    assert_trees_close(u, v, rtol=1e-6, atol=1e-7)


# ----------------------------------------------- deep MLP, all executors

DEPTH, WIDTH = 6, 16


def _deep():
  return deep_mlp(DEPTH, WIDTH, 32, 4)


def _train(executor, policy, restrict_descent, steps=7):
  params, loss, x, y = _deep()
  tx = selective(optax.sgd(0.1, momentum=0.9), policy,
                               executor=executor,
                               restrict_descent=restrict_descent)
  state = tx.init(params)
  if executor == "specialize":
    step = optax_sam.SpecializedStep(tx, loss)
  else:
    step = jax.jit(optax_sam.make_update(tx, loss))
  sels = []
  for _ in range(steps):
    (_, _), u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
    sels.append(np.asarray(state.last_selection).astype(int).tolist())
  return params, sels, state, step


POLICIES = {
    "top2_every3": lambda: optax_sam.policies.reselect_every(
        optax_sam.policies.top_k(2), 3),
    "bandit": lambda: optax_sam.policies.bandit(0.3, eta=1.0,
                                                scale_invariant=True),
    "random2": lambda: optax_sam.policies.random_k(2),
}


@pytest.mark.parametrize("policy, restrict_descent", [
    ("top2_every3", False), ("bandit", True), ("random2", False)])
def test_executors_equal_dense(policy, restrict_descent):
  # The bandit draws a new selection most steps, and "specialize" compiles
  # one program per selection: 4 steps keep its case cheap.
  steps = 4 if policy == "bandit" else 5
  ref, ref_sels, _, _ = _train("dense", POLICIES[policy](), restrict_descent,
                               steps)
  assert len({tuple(s) for s in ref_sels}) > 1
  for ex in ("switch", "specialize"):
    got, sels, _, _ = _train(ex, POLICIES[policy](), restrict_descent, steps)
    assert sels == ref_sels
    assert_trees_close(got, ref, rtol=1e-6, atol=1e-7)


def _selections(policy, steps=8, **kwargs):
  """Selections of selective_sam on the 2-layer MLP, and the last state."""
  p, x, y = setup(0)
  tx = selective(optax.sgd(LR), policy, executor="dense",
                               **kwargs)
  _, sels, state = _run(tx, p, x, y, steps, "c2", True)
  return [s.astype(int).tolist() for s in sels], state


SEEDED = {
    "bandit": lambda **kw: optax_sam.policies.bandit(0.5, eta=1.0, **kw),
    "random_k": lambda **kw: optax_sam.policies.random_k(1, **kw),
}


@pytest.mark.parametrize("policy", sorted(SEEDED))
def test_seed_may_be_a_typed_or_raw_key(policy):
  ref, _ = _selections(SEEDED[policy](), seed=3)
  for seed in (jax.random.PRNGKey(3), jax.random.key(3)):
    sels, state = _selections(SEEDED[policy](), seed=seed)
    assert sels == ref
  assert jax.dtypes.issubdtype(state.policy.key.dtype, jax.dtypes.prng_key)


@pytest.mark.parametrize("policy", sorted(SEEDED))
def test_the_policy_seed_is_the_one_used(policy):
  make = SEEDED[policy]
  # The policy's own seed drives it (it was silently replaced by 0).
  by_policy, _ = _selections(make(seed=5))
  by_engine, _ = _selections(make(), seed=5)
  other, _ = _selections(make(seed=6))
  assert by_policy == by_engine
  assert by_policy != other
  # Both given: the same seed is fine, two different ones raise.
  same, _ = _selections(make(seed=5), seed=jax.random.key(5))
  assert same == by_policy
  with pytest.raises(ValueError, match="one place"):
    selective(optax.sgd(0.1), make(seed=5), seed=6)
  # Held by reselect_every, the seed is still the policy's.
  held, _ = _selections(optax_sam.policies.reselect_every(make(seed=5), 1))
  assert held == by_policy


def test_no_recompilation_under_switch_and_branch_counts():
  _, sels, state, step = _train("switch", POLICIES["random2"](), False, 12)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  counts = np.asarray(state.branch_counts)
  assert counts.sum() == 12 and len(counts) == DEPTH
  # The depth menu's branch j covers groups L-1-j..L-1: the lowest selected
  # group decides the branch.
  lowest = [DEPTH - 1 - min(i for i, f in enumerate(s) if f) for s in sels]
  np.testing.assert_array_equal(np.bincount(lowest, minlength=DEPTH), counts)
  assert 0.0 < float(state.ascent_active) <= 1.0
  assert float(state.descent_active) == 1.0


def test_branch_counts_saturate_instead_of_wrapping():
  p, x, y = setup(0)
  tx = selective(optax.sgd(LR), optax_sam.policies.top_k(1))
  params = to_jax(p)
  state = tx.init(params)
  big = np.iinfo(np.int32).max
  state = state._replace(branch_counts=jnp.full_like(state.branch_counts,
                                                     big))
  _, _, state = jax.jit(optax_sam.make_update(tx, jax_loss))(params, state,
                                                             x, y)
  assert np.asarray(state.branch_counts).tolist() == [big] * 2


def test_specialized_step_compiles_once_per_subset():
  _, sels, _, step = _train("specialize", POLICIES["top2_every3"](), False,
                            10)
  distinct = {tuple(s) for s in sels}
  assert step.compilations == len(distinct)
  assert set(step.selections) == {tuple(bool(f) for f in s)
                                  for s in distinct}


def test_specialize_without_driver_errors():
  params, loss, x, y = _deep()
  tx = selective(optax.sgd(0.1), optax_sam.policies.top_k(1),
                               executor="specialize")
  with pytest.raises(ValueError, match="SpecializedStep"):
    optax_sam.make_update(tx, loss)(params, tx.init(params), x, y)


def test_branch_flops_match_static_subset():
  params, loss, x, y = _deep()
  groups = optax_sam.layer_groups(params)
  tx = selective(optax.sgd(0.1), optax_sam.policies.top_k(2),
                               executor="specialize")
  state = tx.init(params)
  update = optax_sam.make_update(tx, loss)

  def branch(flags):
    return flops(lambda p, s, a, b: update(p, s, a, b,
                                            static_selection=flags),
                  params, state, x, y)

  def static(names):
    st = optax_sam.sam(optax.sgd(0.1), mask=groups.mask(names))
    return flops(optax_sam.make_update(st, loss), params, st.init(params),
                  x, y)

  full = branch((True,) * DEPTH)
  last2 = branch((False,) * (DEPTH - 2) + (True, True))
  # The dynamic step's extras (masks, per-layer norms, the policy) are small.
  assert last2 == pytest.approx(static([-2, -1]), rel=0.05)
  assert full == pytest.approx(static(list(range(DEPTH))), rel=0.05)
  assert last2 < 0.75 * full


def test_bad_input():
  with pytest.raises(TypeError, match="Policy"):
    selective(optax.sgd(0.1), "top2")
  with pytest.raises(ValueError, match="executor"):
    selective(optax.sgd(0.1), optax_sam.policies.top_k(1),
                            executor="magic")
  with pytest.raises(ValueError, match="rho"):
    selective(optax.sgd(0.1), optax_sam.policies.top_k(1), rho=0.0)
  with pytest.raises(ValueError, match="k must be"):
    selective(optax.sgd(0.1), optax_sam.policies.top_k(3)).init(
        to_jax(setup(0)[0]))


# ------------------------------------------------------ 8 devices (pmap)


def test_pmap_identical_selections():
  n = 8
  if jax.device_count() < n:
    pytest.skip("needs 8 devices")
  params, loss, x, y = _deep()
  policy = optax_sam.policies.bandit(0.3, eta=1.0, scale_invariant=True)
  tx = selective(optax.sgd(0.1), policy, axis_name="d",
                               restrict_descent=True)
  rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape),
                               t)
  step = jax.pmap(optax_sam.make_update(tx, loss), axis_name="d")
  p, s = rep(params), rep(tx.init(params))
  xs = x.reshape(n, -1, WIDTH)
  ys = y.reshape(n, -1, WIDTH)
  seen = []
  for _ in range(6):
    _, u, s = step(p, s, xs, ys)
    p = optax.apply_updates(p, u)
    sel = np.asarray(s.policy.selection)
    assert (sel == sel[0]).all(), "selections differ across devices"
    seen.append(tuple(sel[0]))
    for leaf in jax.tree.leaves(p):
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0],
                                                          leaf.shape))
  assert len(set(seen)) > 1
