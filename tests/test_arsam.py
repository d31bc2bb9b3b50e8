"""ARSAM and the reuse engine: numpy references, SAM equivalence, cost,
schedules and data parallelism."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import (assert_trees_close, deep_mlp, device_data, flops,
                   jax_loss, make_step, replicate, rolling_batches, run_steps,
                   setup, shard_map_train, shards, stack, to_jax)

LR, MOM, RHO, SEED = 0.1, 0.9, 0.05, 3
# A small adaptive schedule whose rate moves within a few windows.
ADAPTIVE = dict(window=4, blocks=2, max_fraction=1.0, gains=(0.6, 0.6),
                init_rate=2.0, warmup_steps=3)


def _uniforms(seed, steps):
  key = jax.random.PRNGKey(seed)
  return [float(jax.random.uniform(jax.random.fold_in(key, t)))
          for t in range(steps)]


def _psf_reference(p, x, y, steps, decide, decay=0.7, horizon=6,
                   observe=None):
  return reference.run_reuse_momentum(
      p, rolling_batches(x, y), steps, LR, MOM, RHO, decide,
      reference.psf_store,
      lambda g, s, age: reference.psf_mix(g, s, age, decay, horizon),
      observe)


# No-jit C2 runs in test_looksam (the same engine).
@pytest.mark.parametrize("path,jit,steps", [
    ("c1", True, 15), ("c2", True, 15), ("c1", False, 4)])
def test_adaptive_arsam_matches_numpy_reference(path, jit, steps):
  p, x, y = setup()
  tx = optax_sam.arsam(optax.sgd(LR, momentum=MOM), rho=RHO, seed=SEED,
                       schedule=optax_sam.schedules.recompute_adaptive(**ADAPTIVE))
  got, states = run_steps(tx, to_jax(p), rolling_batches(x, y), path, steps,
                          jit)
  sched = reference.AdaptiveScheduleRef(_uniforms(SEED, steps), **{
      k if k != "warmup_steps" else "warmup": v for k, v in ADAPTIVE.items()})
  want, decisions = _psf_reference(p, x, y, steps, lambda t: sched.decide(),
                                   observe=sched.observe)
  assert [bool(s.recomputed) for s in states] == decisions
  np.testing.assert_allclose([float(s.schedule.rate) for s in states],
                             sched.rates, rtol=1e-5)
  for g, w in zip(got, want):
    assert_trees_close(g, w, rtol=2e-5, atol=2e-6)
  assert int(states[-1].recomputes) == sum(decisions)
  np.testing.assert_allclose(optax_sam.recompute_fraction(states[-1]),
                             sum(decisions) / steps, rtol=1e-6)
  if steps == 15:
    # The sampled sequence is non-trivial: reuse steps after the warm-up
    # and a rate that moved away from its initial value.
    assert decisions[:3] == [True] * 3 and not all(decisions[3:])
    assert any(abs(r - 2.0) > 1e-3 for r in sched.rates)


@pytest.mark.parametrize("decay,horizon", [(0.7, 6), (0.5, 2), (1.0, None)])
def test_psf_mixing_matches_reference(decay, horizon):
  p, x, y = setup(2)
  tx = optax_sam.arsam(optax.sgd(LR, momentum=MOM), rho=RHO, decay=decay,
                       horizon=horizon,
                       schedule=optax_sam.schedules.recompute_every(5))
  got, states = run_steps(tx, to_jax(p), rolling_batches(x, y), "c2", 11)
  want, decisions = _psf_reference(p, x, y, 11, lambda t: t % 5 == 0,
                                   decay, horizon)
  assert [bool(s.recomputed) for s in states] == decisions
  assert [int(s.age) for s in states] == [0, 1, 2, 3, 4] * 2 + [0]
  for g, w in zip(got, want):
    assert_trees_close(g, w, rtol=2e-5, atol=2e-6)


def test_bernoulli_schedule_matches_reference():
  p, x, y = setup(1)
  steps, prob = 12, 0.4
  tx = optax_sam.arsam(optax.sgd(LR, momentum=MOM), rho=RHO, seed=SEED,
                       schedule=optax_sam.schedules.recompute_with_probability(prob))
  got, states = run_steps(tx, to_jax(p), rolling_batches(x, y), "c1", steps)
  u = _uniforms(SEED, steps)
  want, decisions = _psf_reference(p, x, y, steps, lambda t: u[t] < prob)
  assert [bool(s.recomputed) for s in states] == decisions
  assert 0 < sum(decisions) < steps
  for g, w in zip(got, want):
    assert_trees_close(g, w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("path", ["c1", "c2"])
def test_recompute_always_is_sam_exactly(path):
  p, x, y = setup()
  params = to_jax(p)
  batches = rolling_batches(x, y)
  sam, _ = run_steps(optax_sam.sam(optax.sgd(LR, momentum=MOM), rho=RHO),
                     params, batches, path, 3)
  static, _ = run_steps(optax_sam.arsam(
      optax.sgd(LR, momentum=MOM), rho=RHO,
      schedule=optax_sam.schedules.recompute_always()), params, batches, path,
      3)
  for a, b in zip(static, sam):
    chex.assert_trees_all_equal(a, b)
  # Dynamic predicates that are always true (a lax.cond in the program):
  # interval 1, and the default adaptive schedule inside its warm-up.
  for schedule in ((optax_sam.schedules.recompute_every(1), None)
                   if path == "c2" else ()):
    dyn, states = run_steps(
        optax_sam.arsam(optax.sgd(LR, momentum=MOM), rho=RHO,
                        schedule=schedule), params, batches, path, 3)
    assert all(bool(s.recomputed) for s in states)
    for a, b in zip(dyn, sam):
      assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


def test_recompute_never_is_the_base_optimizer():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.arsam(optax.sgd(LR),
                       schedule=optax_sam.schedules.recompute_never())
  (_, _), u, st = jax.jit(optax_sam.make_update(tx, jax_loss))(
      params, tx.init(params), x, y)
  g = jax.grad(jax_loss)(params, x, y)
  assert_trees_close(u, jax.tree.map(lambda a: -LR * a, g), rtol=1e-6)
  assert int(st.recomputes) == 0 and not bool(st.recomputed)


@pytest.mark.parametrize("path", ["c1", "c2"])
def test_zero_gradient_gives_finite_updates(path):
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  zero_loss = lambda q, *_: 0.0 * jnp.sum(q["w"]) + 0.0 * q["b"]
  tx = optax_sam.arsam(optax.sgd(0.1),
                       schedule=optax_sam.schedules.recompute_every(2))
  state = tx.init(params)
  if path == "c2":
    step = jax.jit(optax_sam.make_update(tx, zero_loss))
  else:
    def step(q, st):
      u, st = tx.update(jax.grad(zero_loss)(q), st, q,
                        grad_fn=lambda r, i: jax.grad(zero_loss)(r))
      return None, u, st
  for _ in range(3):  # recompute, reuse, recompute
    _, u, state = step(params, state)
    for leaf in jax.tree.leaves(u):
      assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_adaptive_schedule_stays_finite_on_zero_and_tiny_gradients(scale):
  params = {"w": jnp.ones((3,))}
  loss = lambda q: scale * jnp.sum(q["w"])
  tx = optax_sam.arsam(
      optax.sgd(0.1), schedule=optax_sam.schedules.recompute_adaptive(
          window=4, blocks=2, warmup_steps=2))
  step = jax.jit(optax_sam.make_update(tx, loss))
  state = tx.init(params)
  for _ in range(10):
    _, u, state = step(params, state)
    assert np.all(np.isfinite(np.asarray(u["w"])))
  for leaf in jax.tree.leaves(state.schedule):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_bad_inputs_raise_clear_errors():
  sgd = optax.sgd(0.1)
  for rho in (0.0, -0.1):
    with pytest.raises(ValueError, match="rho"):
      optax_sam.arsam(sgd, rho=rho)
  with pytest.raises(ValueError, match="sync_ascent"):
    optax_sam.arsam(sgd, sync_ascent=True)
  with pytest.raises(TypeError, match="ReuseSchedule"):
    optax_sam.arsam(sgd, schedule=5)
  with pytest.raises(ValueError, match="decay"):
    optax_sam.arsam(sgd, decay=-0.5)
  with pytest.raises(ValueError, match="horizon"):
    optax_sam.arsam(sgd, horizon=-1)
  with pytest.raises(ValueError, match="window"):
    optax_sam.schedules.recompute_adaptive(window=1)
  with pytest.raises(ValueError, match="blocks"):
    optax_sam.schedules.recompute_adaptive(window=6, blocks=4)
  with pytest.raises(ValueError, match="max_fraction"):
    optax_sam.schedules.recompute_adaptive(max_fraction=1.5)
  with pytest.raises(ValueError, match="init_rate"):
    optax_sam.schedules.recompute_adaptive(init_rate=0.5)
  with pytest.raises(ValueError, match="gains"):
    optax_sam.schedules.recompute_adaptive(gains=(0.1,))
  with pytest.raises(ValueError, match="warmup_steps"):
    optax_sam.schedules.recompute_adaptive(warmup_steps=-3)
  with pytest.raises(ValueError, match="p must"):
    optax_sam.schedules.recompute_with_probability(1.2)
  params = {"w": jnp.ones(2)}
  tx = optax_sam.arsam(sgd)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, tx.init(params), params)


def test_rho_schedule_follows_the_step_count():
  params = {"w": jnp.ones((3,))}
  loss = lambda q: jnp.sum(q["w"] ** 2)
  tx = optax_sam.arsam(optax.sgd(0.1), rho=optax.linear_schedule(0.1, 0.0, 10),
                       schedule=optax_sam.schedules.recompute_every(3))
  step = jax.jit(optax_sam.make_update(tx, loss))
  state = tx.init(params)
  for _ in range(5):
    _, _, state = step(params, state)
  counts = [int(x) for x in jax.tree.leaves(state.perturbation_state)]
  assert counts == [5]


def test_no_recompilation_and_bf16_dtype():
  p, x, y = setup()
  params = to_jax(p, jnp.bfloat16)
  tx = optax_sam.arsam(optax.sgd(LR, momentum=MOM),
                       schedule=optax_sam.schedules.recompute_every(2))
  step = jax.jit(chex.assert_max_traces(optax_sam.make_update(
      tx, lambda q, xb, yb: jax_loss(q, xb, yb).astype(jnp.float32)), n=1))
  state = tx.init(params)
  xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  for _ in range(3):
    _, u, state = step(params, state, xb, yb)
    params = optax.apply_updates(params, u)
  chex.assert_trees_all_equal_dtypes(params, to_jax(p, jnp.bfloat16))
  chex.assert_trees_all_equal_dtypes(state.stored, params)
  for leaf in jax.tree.leaves(params):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))



@pytest.mark.parametrize("factory", [optax_sam.arsam, optax_sam.looksam])
def test_inject_hyperparams(factory):
  p, x, y = setup()
  params = to_jax(p)
  kw = {"schedule": optax_sam.schedules.recompute_every(2)} if (
      factory is optax_sam.arsam) else {"every": 2}
  static = ("schedule",) if factory is optax_sam.arsam else ()
  injected = optax.inject_hyperparams(factory, static_args=static)(
      optimizer=optax.sgd(LR), rho=RHO, **kw)
  got, states = run_steps(injected, params, rolling_batches(x, y), "c2", 3)
  want, _ = run_steps(factory(optax.sgd(LR), rho=RHO, **kw), params,
                      rolling_batches(x, y), "c2", 3)
  assert_trees_close(got[-1], want[-1], rtol=1e-6, atol=1e-7)
  assert [bool(s.inner_state.recomputed) for s in states] == [1, 0, 1]


# --- The adaptive schedule on its own (synthetic statistics). ---


def _drive(schedule, steps, psf_norm):
  state = schedule.init(jax.random.PRNGKey(0))
  decide, update = jax.jit(schedule.decide), jax.jit(schedule.update)
  decisions, rates = [], []
  for t in range(steps):
    rec = decide(state)
    rates.append(float(state.rate))
    stats = optax_sam.schedules.ReuseStats(jnp.float32(psf_norm(t)),
                                           jnp.float32(1.0))
    state = update(state, rec, stats)
    decisions.append(bool(rec))
  return decisions, rates


@pytest.mark.parametrize("trend", [1.5, 0.5])
def test_adaptive_quota_per_window_and_rate_follows_trend(trend):
  window, warmup = 10, 10
  schedule = optax_sam.schedules.recompute_adaptive(
      window=window, blocks=2, max_fraction=0.8, gains=(0.5, 0.0),
      init_rate=3.0, warmup_steps=warmup)
  decisions, rates = _drive(schedule, warmup + 6 * window,
                            lambda t: trend ** t)
  assert all(decisions[:warmup])
  for w in range(6):
    lo = warmup + w * window
    assert sum(decisions[lo:lo + window]) == int(np.floor(rates[lo]))
    assert all(r == rates[lo] for r in rates[lo:lo + window])
  window_rates = rates[warmup::window]
  if trend > 1:  # a growing PSF ratio raises the rate, up to 0.8 * window
    assert window_rates[0] > 3.0 and window_rates[-1] == 8.0
  else:
    assert window_rates[0] < 3.0 and window_rates[-1] == 1.0


def test_probability_schedule_is_deterministic_per_seed():
  sched = optax_sam.schedules.recompute_with_probability(0.3)
  state = sched.init(jax.random.PRNGKey(7))
  stats = optax_sam.schedules.ReuseStats(jnp.float32(0), jnp.float32(0))
  out = []
  for _ in range(400):
    out.append(bool(sched.decide(state)))
    state = sched.update(state, out[-1], stats)
  assert 0.22 < np.mean(out) < 0.38
  assert out[:20] == [u < 0.3 for u in _uniforms(7, 20)]


def test_cond_predicate_is_the_states_next_recompute():
  """The jitted cond and SpecializedStep follow one predicate."""
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.arsam(optax.sgd(0.1), rho=0.05)
  step = make_step(tx, "c2")
  state = tx.init(params)
  _, _, state = step(params, state, to_jax(x), to_jax(y))  # first: recomputes
  for forced in (False, True, False):
    _, _, new = step(params, state._replace(next_recompute=jnp.asarray(forced)),
                     to_jax(x), to_jax(y))
    assert bool(new.recomputed) == forced
    assert int(new.recomputes) == int(state.recomputes) + forced


@pytest.mark.parametrize("schedule", [
    optax_sam.schedules.recompute_with_probability(0.3),
    optax_sam.schedules.recompute_adaptive(**ADAPTIVE)],
                         ids=["probability", "adaptive"])
def test_schedules_take_typed_and_raw_keys(schedule):
  stats = optax_sam.schedules.ReuseStats(jnp.float32(1), jnp.float32(2))
  runs = []
  for key in (jax.random.PRNGKey(7), jax.random.key(7)):
    state = schedule.init(key)
    out = []
    for _ in range(30):
      out.append(bool(jax.jit(schedule.decide)(state)))
      state = jax.jit(schedule.update)(state, out[-1], stats)
    runs.append(out)
  assert runs[0] == runs[1] and 0 < sum(runs[0]) < 30


def test_arsam_seed_may_be_a_typed_or_raw_key():
  p, x, y = setup()
  params = to_jax(p)
  sched = optax_sam.schedules.recompute_with_probability(0.5)
  runs = []
  for seed in (SEED, jax.random.PRNGKey(SEED), jax.random.key(SEED)):
    tx = optax_sam.arsam(optax.sgd(LR), rho=RHO, schedule=sched, seed=seed)
    runs.append(run_steps(tx, params, rolling_batches(x, y), "c2", 6))
  for got, states in runs[1:]:
    assert [bool(s.recomputed) for s in states] == [
        bool(s.recomputed) for s in runs[0][1]]
    assert_trees_close(got[-1], runs[0][0][-1], rtol=0, atol=0)


def test_engine_counters_saturate_instead_of_wrapping():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.arsam(optax.sgd(LR), rho=RHO,
                       schedule=optax_sam.schedules.recompute_every(2))
  step = jax.jit(optax_sam.make_update(tx, jax_loss))
  big = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
  state = tx.init(params)
  _, _, state = step(params, state, x, y)  # store a PSF first
  state = state._replace(age=big, recomputes=big)
  for recompute in (False, True):  # count 1: reuse (age), 2: recompute
    _, u, state = step(params, state, x, y)
    assert bool(state.recomputed) == recompute
    assert int(state.age) == (0 if recompute else int(big))
    assert int(state.recomputes) == int(big)
    for leaf in jax.tree.leaves(u):
      assert np.all(np.isfinite(np.asarray(leaf)))


# --- Compiled cost: reuse branch ~ 1 SGD gradient, recompute ~ 2. ---

DEPTH, WIDTH, BATCH = 4, 128, 64


def _mlp():
  params, loss, x, _ = deep_mlp(DEPTH, WIDTH, BATCH, scale=12)
  return params, loss, x


def case_region_dots(text):
  """For each ``stablehlo.case`` in lowered text: (dots before it, dots in
  each branch region)."""
  lines = text.splitlines()
  out = []
  for i, line in enumerate(lines):
    if '"stablehlo.case"' not in line:
      continue
    indent = re.match(r"\s*", line).group(0)
    regions, j = [0], i + 1
    while not lines[j].startswith(indent + "})"):
      if lines[j] == indent + "}, {":
        regions.append(0)
      elif "stablehlo.dot_general" in lines[j]:
        regions[-1] += 1
      j += 1
    before = sum("stablehlo.dot_general" in line for line in lines[:i])
    out.append((before, regions))
  return out


@pytest.fixture(scope="module")
def mlp():
  params, loss, x = _mlp()
  return params, loss, x, flops(jax.grad(loss), params, x, x)


def _ratio(mlp, tx):
  params, loss, x, sgd = mlp
  step = optax_sam.make_update(tx, loss)
  return flops(step, params, tx.init(params), x, x) / sgd


def test_branch_flops(mlp):
  sgd = optax.sgd(0.1)
  reuse = _ratio(mlp, optax_sam.arsam(
      sgd, schedule=optax_sam.schedules.recompute_never()))
  recompute = _ratio(mlp, optax_sam.arsam(
      sgd, schedule=optax_sam.schedules.recompute_always()))
  sam = _ratio(mlp, optax_sam.sam(sgd))
  dynamic = _ratio(mlp, optax_sam.arsam(sgd))
  assert 0.98 < reuse < 1.05
  assert 1.95 < recompute < 2.06 and abs(recompute - sam) < 0.02
  # XLA's cost of a conditional is its costliest branch: the clean pass
  # (outside) plus the perturbed pass (recompute branch), not three passes.
  assert 1.95 < dynamic < 2.08


def test_clean_pass_outside_the_cond_perturbed_pass_inside(mlp):
  params, loss, x, _ = mlp
  tx = optax_sam.arsam(optax.sgd(0.1))
  text = jax.jit(optax_sam.make_update(tx, loss)).lower(
      params, tx.init(params), x, x).as_text()
  per_grad = 3 * DEPTH - 1  # forward, weight and input gradients
  (before, regions), = case_region_dots(text)
  assert before == per_grad
  assert sorted(regions) == [0, per_grad]  # reuse: none; recompute: one pass


# --- Data parallelism on 8 simulated devices. ---

@pytest.mark.parametrize("sync_ascent", [False, True])
def test_pmap_replicas_identical_and_match_reference(sync_ascent):
  p, x, y = device_data()
  steps = 7
  tx = optax_sam.arsam(optax.sgd(LR), rho=RHO, seed=SEED, axis_name="dev",
                       sync_ascent=sync_ascent,
                       schedule=optax_sam.schedules.recompute_adaptive(**ADAPTIVE))
  train = jax.pmap(optax_sam.make_update(tx, jax_loss), axis_name="dev")
  params = to_jax(p)
  out, st = replicate(params), replicate(tx.init(params))
  xb, yb = stack(x), stack(y)
  recs = []
  for _ in range(steps):  # one compiled step, called repeatedly
    _, u, st = train(out, st, xb, yb)
    out = optax.apply_updates(out, u)
    recs.append(np.asarray(st.recomputed))
    for leaf in jax.tree.leaves(st):
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  for leaf in jax.tree.leaves((out, st)):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  sched = reference.AdaptiveScheduleRef(_uniforms(SEED, steps), **{
      k if k != "warmup_steps" else "warmup": v for k, v in ADAPTIVE.items()})
  want, decisions = reference.run_reuse_momentum(
      p, lambda t: shards(x, y), steps, LR, 0.0, RHO,
      lambda t: sched.decide(),
      reference.psf_store,
      lambda g, s, age: reference.psf_mix(g, s, age, 0.7, 6), sched.observe,
      sync_ascent=sync_ascent)
  assert [bool(r[0]) for r in recs] == decisions
  assert not all(decisions)
  assert_trees_close(jax.tree.map(lambda a: a[0], out), want[-1],
                     rtol=2e-5, atol=2e-6)


def test_shard_map_matches_reference():
  p, x, y = device_data()
  tx = optax_sam.arsam(optax.sgd(LR), rho=RHO, axis_name="dev",
                       schedule=optax_sam.schedules.recompute_every(2))
  train = shard_map_train(optax_sam.make_update(tx, jax_loss), steps=3)
  params = to_jax(p)
  out = train(params, tx.init(params), stack(x), stack(y))
  want, _ = reference.run_reuse_momentum(
      p, lambda t: shards(x, y), 3, LR, 0.0, RHO, lambda t: t % 2 == 0,
      reference.psf_store,
      lambda g, s, age: reference.psf_mix(g, s, age, 0.7, 6))
  assert_trees_close(out, want[-1], rtol=2e-5, atol=2e-6)
