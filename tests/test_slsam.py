"""SL-SAM (optax_sam.slsam) and the pieces it is built from.

* the bandit's probabilities equal a line-by-line numpy port of the
  authors' ``get_prob`` for a fixed sequence of norms and draws;
* the update rule equals an independent numpy SL-SAM (drawn leaves only,
  frozen momentum), C1 and C2, with and without jit;
* ``fraction=1`` is SAM; unselected leaves and their optimizer state are
  bit-for-bit unchanged, for SGD with momentum, AdamW, chains and
  ``inject_hyperparams``; optax's shared count advances;
* the gated executor equals the dense one, its gradients equal ``jax.grad``
  on the gated-on leaves (Dense, Conv, attention), and it compiles once;
* the same draw on 8 devices (pmap and shard_map); non-finite statistics do
  not enter the bandit; bad arguments raise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import (assert_trees_close, device_data, jax_loss, make_step,
                   replicate, setup, shard_map_train, stack, to_jax)
from optax_sam._src import gating
from optax_sam._src.policies import LayerStats, cap_to_budget

LR, MOM, RHO = 0.1, 0.9, 0.05
LEAVES = (("hidden", "b"), ("hidden", "w"), ("out", "b"), ("out", "w"))


def _stats(norms):
  n = len(norms)
  return LayerStats(jnp.asarray(np.square(norms), jnp.float32),
                    jnp.ones(n, bool), jnp.ones(n, jnp.float32))


# ------------------------------------------------------------ the bandit


@pytest.mark.parametrize("fraction, eta, scale", [
    (0.5, 1e-3, 1.0), (0.3, 0.05, 3.0), (0.2, 0.5, 1.0)])
def test_bandit_matches_get_prob_port(fraction, eta, scale):
  rng = np.random.default_rng(0)
  pol = optax_sam.policies.bandit(fraction, eta)
  state = pol.init(9, jax.random.PRNGKey(1))
  np.testing.assert_allclose(state.score, fraction)
  update = jax.jit(pol.update)
  moved = 0.0
  for _ in range(25):
    norms = (rng.exponential(size=9) * scale).astype(np.float32)
    drawn = np.nonzero(np.asarray(state.selection))[0]
    assert drawn.size >= 1
    want = reference.slsam_get_prob(state.score, fraction, eta,
                                    norms[drawn], drawn)
    new = update(state, _stats(norms))
    np.testing.assert_allclose(new.score, want, rtol=2e-5, atol=1e-7)
    moved = max(moved, float(np.max(np.abs(want - fraction))))
    state = new
  assert moved > 1e-3, "the sequence should move the probabilities"


def test_cap_to_budget_matches_sorted_loop():
  rng = np.random.default_rng(3)
  cap = jax.jit(cap_to_budget)
  for _ in range(60):
    n = int(rng.choice([1, 2, 5, 9]))
    w = rng.exponential(size=n) ** rng.uniform(0.5, 4.0)
    s = float(rng.uniform(0.05, 1.0))
    # With alpha_p = 0 the port's weights are the probabilities themselves:
    # only its capping loop acts.
    want = reference.slsam_get_prob(w, s, 0.0, np.ones(n), np.arange(n))
    got = np.clip(cap(jnp.asarray(w, jnp.float32), jnp.float32(s * n)),
                  1e-8, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_bandit_skips_non_finite_statistics():
  pol = optax_sam.policies.bandit(0.5, eta=0.1)
  state = pol.init(4, jax.random.PRNGKey(0))
  before = np.asarray(state.score)
  stats = LayerStats(jnp.array([jnp.inf, jnp.nan, 1.0, 1.0]),
                     jnp.array([True, True, False, False]), jnp.ones(4))
  # Through the engine a non-finite statistic is unobserved; the policy
  # alone also refuses it.
  state = pol.update(state._replace(selection=jnp.array(
      [True, True, False, False])), stats)
  assert np.all(np.isfinite(state.score))
  np.testing.assert_allclose(state.score, before)


# ------------------------------------------------------- the update rule


def _per_leaf(selection):
  return {LEAVES[i] for i, f in enumerate(np.asarray(selection)) if f}


@pytest.mark.parametrize("path, jit, executor", [
    ("c2", True, "gated"), ("c2", False, "gated"), ("c1", True, "gated"),
    ("c2", True, "dense"), ("c2", True, "switch")])
def test_matches_numpy_reference(path, jit, executor):
  p, x, y = setup(0)
  tx = optax_sam.slsam(optax.sgd(LR, momentum=MOM), rho=RHO, fraction=0.5,
                       eta=1e-3, executor=executor, seed=4)
  state = tx.init(to_jax(p))
  step = make_step(tx, path, jit)
  params, got, sels = to_jax(p), [], []
  for _ in range(8):
    sels.append(_per_leaf(state.policy.selection))
    _, u, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
    params = optax.apply_updates(params, u)
    got.append(params)
    assert _per_leaf(state.last_selection) == sels[-1]
  assert len({frozenset(s) for s in sels}) > 1, "draws should differ"
  want = reference.run_slsam_momentum(p, x, y, sels, LR, MOM, RHO)
  for a, b in zip(got, want):
    assert_trees_close(a, b, rtol=2e-5, atol=2e-6)


def test_fraction_one_is_sam():
  p, x, y = setup(0)
  results = []
  for tx in (optax_sam.slsam(optax.sgd(LR, momentum=MOM), rho=RHO,
                             fraction=1.0,
                             executor=optax_sam.executors.gated()),
             optax_sam.slsam(optax.sgd(LR, momentum=MOM), rho=RHO,
                             fraction=1.0),
             optax_sam.sam(optax.sgd(LR, momentum=MOM), rho=RHO)):
    state, params = tx.init(to_jax(p)), to_jax(p)
    step = make_step(tx, "c2")
    for _ in range(5):
      _, u, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
      params = optax.apply_updates(params, u)
    results.append(params)
  # The default (dense when everything is drawn) is SAM's arithmetic
  # exactly; the gated one computes the same products through custom
  # derivatives (summation order may differ).
  jax.tree.map(np.testing.assert_array_equal, results[1], results[2])
  assert_trees_close(results[0], results[2], rtol=1e-6, atol=1e-7)


BASES = {
    "sgd_momentum": lambda: optax.sgd(LR, momentum=MOM),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                 optax.adamw(1e-2, weight_decay=0.1)),
    "inject": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("base", sorted(BASES))
def test_unselected_leaves_and_state_are_frozen(base):
  p, x, y = setup(0)
  tx = optax_sam.slsam(BASES[base](), rho=RHO, fraction=0.4, seed=2)
  state, params = tx.init(to_jax(p)), to_jax(p)
  step = make_step(tx, "c2")
  frozen_seen = 0
  for _ in range(6):
    sel = np.asarray(state.policy.selection)
    old_state, old_params = state, params
    _, u, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
    params = optax.apply_updates(params, u)
    for i, (a, b) in enumerate(zip(jax.tree.leaves(old_params),
                                   jax.tree.leaves(params))):
      if sel[i]:
        assert not np.array_equal(a, b)
      else:
        np.testing.assert_array_equal(a, b)
        frozen_seen += 1
    # Every part of the base state shaped like params: unchanged off the
    # draw; everything else (counts) advances.
    like = lambda t: jax.tree.structure(t) == jax.tree.structure(params)
    olds = jax.tree.leaves(old_state.opt_state, is_leaf=like)
    news = jax.tree.leaves(state.opt_state, is_leaf=like)
    trees = 0
    for o, n in zip(olds, news):
      if like(o):
        trees += 1
        for i, (a, b) in enumerate(zip(jax.tree.leaves(o),
                                       jax.tree.leaves(n))):
          if not sel[i]:
            np.testing.assert_array_equal(a, b)
    assert trees >= 1
  assert frozen_seen > 0
  counts = [c for c in jax.tree.leaves(state.opt_state)
            if np.shape(c) == () and jnp.issubdtype(c.dtype, jnp.integer)]
  if base != "sgd_momentum":
    assert counts and all(int(c) == 6 for c in counts), counts


def test_without_freeze_weight_decay_moves_unselected():
  p, x, y = setup(0)
  tx = optax_sam.slsam(optax.adamw(1e-2, weight_decay=0.1), rho=RHO,
                       fraction=0.25, freeze=False, seed=0)
  state, params = tx.init(to_jax(p)), to_jax(p)
  sel = np.asarray(state.policy.selection)
  _, u, state = make_step(tx, "c2")(params, state, jnp.asarray(x),
                                    jnp.asarray(y))
  moved = [float(np.abs(np.asarray(v)).max()) for v, s in
           zip(jax.tree.leaves(u), sel) if not s]
  assert moved and max(moved) > 0


def test_no_recompilation_and_active_fraction():
  params, loss, x, y = _deep()
  tx = optax_sam.slsam(optax.adamw(1e-3), fraction=0.3)
  state = tx.init(params)
  step = jax.jit(optax_sam.make_update(tx, loss))
  sizes = np.array([np.size(v) for v in jax.tree.leaves(params)], float)
  for _ in range(6):
    sel = np.asarray(state.policy.selection)
    _, u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
    np.testing.assert_allclose(state.ascent_active,
                               sizes[sel].sum() / sizes.sum(), rtol=1e-6)
    np.testing.assert_allclose(state.descent_active, state.ascent_active)
    # Both passes cover the drawn tensors only (the gated clean pass too).
    np.testing.assert_allclose(state.clean_active, state.ascent_active)
    np.testing.assert_allclose(state.perturbed_active, state.ascent_active)
  assert step._cache_size() == 1  # pylint: disable=protected-access


def _deep():
  from benchmarks import cost as cost_lib  # pylint: disable=g-import-not-at-top
  params, loss, x = cost_lib.deep_tanh_mlp(5, 16, 32)
  return params, loss, x, jnp.sin(x)


def test_gated_equals_dense_on_a_cnn():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), name="c0")(x))
      x = nn.relu(nn.Conv(4, (3, 3), strides=2, name="c1")(x))
      return nn.Dense(3, name="d")(x.reshape(x.shape[0], -1))

  net = Net()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 10, 10, 2))
  y = jnp.arange(8) % 3
  params = net.init(jax.random.PRNGKey(1), x)["params"]

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        net.apply({"params": p}, xb), yb).mean()

  out = {}
  for ex in ("gated", "dense"):
    tx = optax_sam.slsam(optax.sgd(0.1, momentum=0.9), fraction=0.5,
                         executor=ex, seed=1)
    st, q = tx.init(params), params
    step = jax.jit(optax_sam.make_update(tx, loss))
    sels = []
    for _ in range(6):
      _, u, st = step(q, st, x, y)
      q = optax.apply_updates(q, u)
      sels.append(np.asarray(st.last_selection).tolist())
    out[ex] = (q, sels)
  assert out["gated"][1] == out["dense"][1]
  assert_trees_close(out["gated"][0], out["dense"][0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- gating


def _attention_problem():
  """One self-attention block written with einsum (products of two
  activations, q k^T and weights v, beside the weight products)."""
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  d = 8
  params = {"q": jax.random.normal(keys[0], (d, d)) / 3,
            "k": jax.random.normal(keys[1], (d, d)) / 3,
            "v": jax.random.normal(keys[2], (d, d)) / 3,
            "o": {"kernel": jax.random.normal(keys[3], (d, 3)) / 3,
                  "bias": jnp.zeros(3)}}
  x = jax.random.normal(keys[4], (2, 5, d))

  def loss(p, xb):
    q, k, v = (jnp.einsum("btd,de->bte", xb, p[n]) for n in "qkv")
    w = jax.nn.softmax(jnp.einsum("bqe,bke->bqk", q, k), axis=-1)
    h = jnp.einsum("bqk,bke->bqe", w, v)
    return jnp.sum(jnp.tanh(h @ p["o"]["kernel"] + p["o"]["bias"]))

  return params, loss, (x,)


def _conv_problem():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(3, (3, 3), name="c0")(x))
      x = nn.relu(nn.Conv(5, (3, 3), strides=2, padding=1, name="c1")(x))
      x = nn.relu(nn.Dense(6, name="d0")(x.reshape(x.shape[0], -1)))
      return nn.Dense(2, name="d1")(x)

  net = Net()
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 9, 9, 2))
  params = net.init(jax.random.PRNGKey(3), x)["params"]
  return params, lambda p, xb: jnp.sum(jnp.sin(net.apply({"params": p},
                                                          xb))), (x,)


@pytest.mark.parametrize("problem", [_attention_problem, _conv_problem],
                         ids=["attention", "conv"])
def test_gated_gradients_equal_jax_grad(problem):
  params, loss, args = problem()
  leaves, treedef = jax.tree.flatten(params)
  assert gating.count_gated_products(loss, params, *args) >= 3
  want = jax.grad(loss)(params, *args)
  rng = np.random.default_rng(0)
  fn = jax.jit(lambda p, sel, *a: jax.value_and_grad(gating.gated(
      loss, jax.tree.unflatten(treedef, list(sel))))(p, *a))
  for _ in range(2):
    sel = rng.random(len(leaves)) < 0.5
    value, got = fn(params, jnp.asarray(sel), *args)
    np.testing.assert_allclose(value, loss(params, *args), rtol=1e-6)
    for s, a, b in zip(sel, jax.tree.leaves(got), jax.tree.leaves(want)):
      if s:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gated_off_leaves_cost_no_weight_gradient():
  params, loss, x, y = _deep()
  leaves, treedef = jax.tree.flatten(params)
  full = jax.grad(loss)
  last_only = jax.grad(gating.gated(loss, jax.tree.unflatten(
      treedef, [i >= len(leaves) - 2 for i in range(len(leaves))])))
  from _util import flops  # pylint: disable=g-import-not-at-top
  # Static gates prune what run-time gates skip: the output layer alone
  # needs no backward pass below it.
  assert flops(last_only, params, x, y) < 0.5 * flops(full, params, x, y)


# ------------------------------------------------------------ devices


def test_same_draw_on_every_device():
  p, x, y = device_data()
  tx = optax_sam.slsam(optax.sgd(LR, momentum=MOM), rho=RHO, fraction=0.5,
                       axis_name="dev")
  step = optax_sam.make_update(tx, jax_loss)

  def one(q, st, xb, yb):
    _, u, st = step(q, st, xb, yb)
    return optax.apply_updates(q, u), st

  pstep = jax.pmap(one, axis_name="dev")
  params = replicate(to_jax(p))
  state = replicate(tx.init(to_jax(p)))
  xs, ys = stack(x), stack(y)
  for _ in range(4):
    params, state = pstep(params, state, xs, ys)
    sel = np.asarray(state.last_selection)
    assert (sel == sel[0]).all()
  for leaf in jax.tree.leaves(params):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  train = shard_map_train(step, steps=3)
  out = train(to_jax(p), tx.init(to_jax(p)), xs, ys)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(out))


# -------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=0.0), "fraction"), (dict(fraction=1.5), "fraction"),
    (dict(eta=-1.0), "eta"), (dict(rho=0.0), "rho"),
    (dict(max_draws=0), "max_draws")])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_sam.slsam(optax.sgd(0.1), **kwargs)


def test_zero_gradients_stay_finite():
  p, x, y = setup(0)
  params = jax.tree.map(jnp.zeros_like, to_jax(p))
  tx = optax_sam.slsam(optax.adamw(1e-2), fraction=0.5)
  state = tx.init(params)
  zero_loss = lambda q, xb, yb: 0.0 * jax_loss(q, xb, yb)
  step = jax.jit(optax_sam.make_update(tx, zero_loss))
  for _ in range(3):
    _, u, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
    params = optax.apply_updates(params, u)
  for leaf in jax.tree.leaves((params, state)):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize("policy, unselected", [
    (lambda: optax_sam.policies.bandit(0.4), "zero"),
    (lambda: optax_sam.policies.top_k(1, ema=0.5), "clean")],
                         ids=["bandit", "top_k"])
def test_a_gradient_spike_does_not_freeze_the_policy(policy, unselected):
  """One step whose loss is scaled by 1e20 (norms ~1e19 overflow when
  squared in float32), then normal steps: the policy's state stays finite
  and it keeps choosing."""
  params, loss, x, y = _deep()
  tx = optax_sam.sharpness_aware(
      optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.01)),
      policy=policy(), unselected=unselected)
  scale = jnp.float32(1.0)
  step = jax.jit(optax_sam.make_update(
      tx, lambda p, xb, yb, c: c * loss(p, xb, yb)))
  state, sels, scores = tx.init(params), [], []
  for t in range(12):
    c = jnp.float32(1e20) if t == 1 else scale
    _, u, state = step(params, state, x, y, c)
    params = optax.apply_updates(params, u)
    assert np.all(np.isfinite(np.asarray(state.policy.score)[
        ~np.isnan(np.asarray(state.policy.score))]))
    sels.append(tuple(np.asarray(state.policy.selection)))
    scores.append(tuple(np.asarray(state.policy.score).tolist()))
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))
  # After the spike the policy still learns: its draws or its scores move.
  assert len(set(sels[2:])) > 1 or len(set(scores[2:])) > 1
