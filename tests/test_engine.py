"""The one engine: policies x schedules x mixers x executors, composed.

Each composition is checked against the independent numpy reference
(``reference.run_composed_momentum``); with every layer and recompute-always
every factory is SAM bit-for-bit under jit; the compiled branches cost what
they should; SpecializedStep drives a composition from the state alone.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import (assert_trees_close, deep_mlp, flops, jax_loss, run_steps,
                   setup, to_jax)

LR, MOM, RHO = 0.1, 0.9, 0.05
LAYERS = ("hidden", "out")
policies, schedules = optax_sam.policies, optax_sam.schedules


def _run(tx, steps=8, path="c2", jit=True, seed=0):
  p, x, y = setup(seed)
  out, states = run_steps(tx, to_jax(p), lambda s: [(x, y)], path, steps,
                          jit)
  sels = [tuple(n for n, f in zip(LAYERS, np.asarray(s.last_selection)) if f)
          for s in states]
  decisions = [bool(s.recomputed) for s in states]
  return out, sels, decisions, states[-1]


def _psf(decay=0.7, horizon=6):
  return (reference.psf_store,
          functools.partial(reference.psf_mix, decay=decay, horizon=horizon))


def _orth(alpha=0.7):
  return (reference.looksam_store,
          lambda g, gv, age: reference.looksam_mix(g, gv, alpha))


def _every(n):
  return lambda t: t % n == 0


# name -> (tx factory, reference keyword arguments)
COMPOSITIONS = {
    "layerwise+every3": (
        lambda: optax_sam.layerwise_sam(
            optax.sgd(LR, momentum=MOM), RHO, num_layers=1, every=2,
            schedule=schedules.recompute_every(3)),
        dict(k=1, interval=2, unselected="clean", decide=_every(3),
             mix_fn=_psf)),
    "layerwise_perturbed+every2": (
        lambda: optax_sam.layerwise_sam(
            optax.sgd(LR, momentum=MOM), RHO, num_layers=1, every=1,
            unselected="perturbed", schedule=schedules.recompute_every(2),
            mixer=schedules.psf_mixer(1.0, None)),
        dict(k=1, interval=1, unselected="perturbed", decide=_every(2),
             mix_fn=lambda: _psf(1.0, None))),
    "arsam+top1": (
        lambda: optax_sam.arsam(
            optax.sgd(LR, momentum=MOM), RHO, policy=policies.top_k(1),
            schedule=schedules.recompute_every(2), decay=0.5),
        dict(k=1, interval=1, unselected="clean", decide=_every(2),
             mix_fn=lambda: _psf(0.5))),
    "looksam+top1": (
        lambda: optax_sam.looksam(
            optax.sgd(LR, momentum=MOM), RHO, every=3, alpha=0.5,
            policy=policies.reselect_every(policies.top_k(1), 2)),
        dict(k=1, interval=2, unselected="clean", decide=_every(3),
             mix_fn=lambda: _orth(0.5))),
    "sam+zero+every2": (
        lambda: optax_sam.sam(
            optax.sgd(LR, momentum=MOM), RHO,
            policy=policies.fixed([1]), unselected="zero",
            schedule=schedules.recompute_every(2)),
        dict(k=1, interval=10**9, unselected="zero", decide=_every(2),
             mix_fn=_psf)),
}


@pytest.mark.parametrize("path, jit", [("c2", True), ("c1", True),
                                       ("c2", False)])
@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_composition_matches_numpy_reference(name, path, jit):
  make, ref = COMPOSITIONS[name]
  ref = dict(ref)
  store, mix = ref.pop("mix_fn")()
  p, x, y = setup(0)
  steps = 8 if jit else 5  # eager steps are slow; 5 still reuse and recompute
  got, sels, decisions, state = _run(make(), steps, path, jit)
  want, want_sels, want_dec = reference.run_composed_momentum(
      p, x, y, steps, LR, MOM, RHO, store=store, mix=mix, **ref)
  assert decisions == want_dec
  assert sels == [tuple(s) for s in want_sels]
  assert 0 < sum(decisions) < len(decisions)
  for a, b in zip(got, want):
    assert_trees_close(a, b, rtol=2e-5, atol=2e-6)
  assert int(state.recomputes) == sum(decisions)


def test_a_composition_changes_its_selection():
  # The reference test above would pass with a frozen selection too.
  _, sels, _, _ = _run(COMPOSITIONS["arsam+top1"][0](), 8)
  assert len(set(sels)) > 1


ALL_AND_ALWAYS = {
    "layerwise_sam": lambda o: optax_sam.layerwise_sam(o, RHO, num_layers=2,
                                                       every=1),
    "layerwise_perturbed": lambda o: optax_sam.layerwise_sam(
        o, RHO, num_layers=2, unselected="perturbed"),
    "layerwise_dense": lambda o: optax_sam.layerwise_sam(
        o, RHO, num_layers=2, executor="dense"),
    "arsam": lambda o: optax_sam.arsam(
        o, RHO, schedule=schedules.recompute_always()),
    "arsam_top2": lambda o: optax_sam.arsam(
        o, RHO, policy=policies.top_k(2),
        schedule=schedules.recompute_always()),
    "looksam": lambda o: optax_sam.looksam(
        o, RHO, schedule=schedules.recompute_always()),
    "sam_policy_all": lambda o: optax_sam.sam(o, RHO,
                                              policy=policies.fixed([0, 1])),
    "asam_as_sam": None,  # asam is a different perturbation: not listed
}


@pytest.mark.parametrize("name", sorted(k for k, v in ALL_AND_ALWAYS.items()
                                        if v is not None))
def test_every_layer_and_always_is_sam_bit_for_bit_under_jit(name):
  base = lambda: optax.sgd(LR, momentum=MOM)
  got, _, _, _ = _run(ALL_AND_ALWAYS[name](base()), 5)
  want, _, _, _ = _run(optax_sam.sam(base(), RHO), 5)
  for a, b in zip(got, want):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_layerwise_reuse_branch_costs_sgd_and_recompute_the_layerwise_branch():
  depth = 6
  params, loss, x, _ = deep_mlp(depth, 128, 64, scale=12, seed=1)
  last = (False,) * (depth - 1) + (True,)

  def cost(tx, **kw):
    fn = optax_sam.make_update(tx, loss)
    return flops(lambda p, s, a, b: fn(p, s, a, b, **kw), params,
                 tx.init(params), x, x)

  sgd = cost(optax_sam.plain(optax.sgd(0.1)))
  lw = cost(optax_sam.layerwise_sam(optax.sgd(0.1), num_layers=1,
                                    executor="specialize"),
            static_selection=last)
  both = optax_sam.layerwise_sam(optax.sgd(0.1), num_layers=1,
                                 executor="specialize",
                                 schedule=schedules.recompute_every(4))
  reuse = cost(both, static_selection=last, static_recompute=False)
  recompute = cost(both, static_selection=last, static_recompute=True)
  assert reuse < 1.06 * sgd
  assert 0.98 * lw < recompute < 1.04 * lw
  assert lw < 1.3 * sgd


def test_specialized_step_drives_a_composition_from_the_state():
  p, x, y = setup(0)
  make = lambda ex: optax_sam.layerwise_sam(
      optax.sgd(LR, momentum=MOM), RHO, num_layers=1, every=2, executor=ex,
      schedule=schedules.recompute_every(3))
  tx_spec, tx_switch = make("specialize"), make("switch")
  step = optax_sam.SpecializedStep(tx_spec, jax_loss)
  switch = jax.jit(optax_sam.make_update(tx_switch, jax_loss))
  params_a = params_b = to_jax(p)
  state_a, state_b = tx_spec.init(params_a), tx_switch.init(params_b)
  for _ in range(7):
    _, ua, state_a = step(params_a, state_a, x, y)
    _, ub, state_b = switch(params_b, state_b, x, y)
    params_a = optax.apply_updates(params_a, ua)
    params_b = optax.apply_updates(params_b, ub)
  assert_trees_close(params_a, params_b, rtol=1e-6, atol=1e-7)
  # (selection, recompute) pairs: more than one program, at most 2 x 2.
  assert 2 <= step.compilations <= 4
  np.testing.assert_array_equal(state_a.branch_counts.sum(), 7)


def test_switch_branch_counts_cover_menu_times_recompute_reuse():
  tx = optax_sam.layerwise_sam(optax.sgd(LR), RHO, num_layers=1,
                               schedule=schedules.recompute_every(2))
  _, _, _, state = _run(tx, 6)
  # Depth menu of 2 entries, recompute per entry, one shared reuse branch.
  assert state.branch_counts.shape == (3,)
  assert int(state.branch_counts[-1]) == 3  # the reuse steps
  assert int(state.branch_counts.sum()) == 6


def _conv_problem():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"conv": {"w": 0.3 * jax.random.normal(k[0], (3, 3, 1, 4))},
            "out": {"w": 0.3 * jax.random.normal(k[1], (4 * 36, 2))}}
  x = jax.random.normal(k[2], (8, 6, 6, 1))

  def loss(p, xb):
    h = jax.lax.conv_general_dilated(xb, p["conv"]["w"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO",
                                                        "NHWC"))
    return jnp.mean(jnp.square(jnp.tanh(h).reshape(8, -1) @ p["out"]["w"]))

  return params, loss, x


def test_auto_avoids_conditionals_over_xla_convolutions_on_the_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the rule under test is the CPU's")
  params, loss, x = _conv_problem()
  tx = lambda ex: optax_sam.layerwise_sam(
      optax.sgd(LR), RHO, num_layers=1, every=1, executor=ex,
      schedule=schedules.recompute_every(2))

  def c1(t):
    def step(p, s, xb):
      g = jax.grad(loss)(p, xb)
      return t.update(g, s, p, grad_fn=lambda q, i: jax.grad(loss)(q, xb))
    return jax.jit(step)

  def conditionals(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("cond[")

  t = tx("auto")
  state = t.init(params)
  # C1 with convolutions: no conditional at all, every case then selected.
  assert conditionals(c1(t), params, state, x) == 0
  # C2, conv_backward="xla": the same; the default "auto": one switch.
  xla = optax_sam.make_update(t, loss, conv_backward="xla")
  assert conditionals(xla, params, state, x) == 0
  assert conditionals(optax_sam.make_update(t, loss), params, state, x) == 1
  # The same updates and decisions as the switch executor.
  p_a = p_b = params
  s_a, s_b = t.init(params), tx("switch").init(params)
  step_a, step_b = c1(t), c1(tx("switch"))
  for _ in range(4):
    u_a, s_a = step_a(p_a, s_a, x)
    u_b, s_b = step_b(p_b, s_b, x)
    p_a = optax.apply_updates(p_a, u_a)
    p_b = optax.apply_updates(p_b, u_b)
  assert_trees_close(p_a, p_b, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s_a.recomputed, s_b.recomputed)


def test_auto_keeps_the_switch_for_a_c1_mlp():
  p, x, y = setup(0)
  tx = optax_sam.layerwise_sam(optax.sgd(LR), RHO, num_layers=1, every=1)
  _, _, _, state = _run(tx, 4, "c1")
  assert int(state.branch_counts[0]) < 4  # switch: the depth menu's entries


def test_zero_and_tiny_gradients_give_finite_updates_in_every_branch():
  tx = optax_sam.layerwise_sam(optax.adamw(1e-3), RHO, num_layers=1,
                               schedule=schedules.recompute_every(2))
  params = to_jax(setup(0)[0])
  state = tx.init(params)
  for scale in (0.0, 1e-30):
    step = jax.jit(optax_sam.make_update(
        tx, lambda q, a, b, s=scale: s * jax_loss(q, a, b)))
    x, y = setup(0)[1:]
    for _ in range(3):
      _, u, state = step(params, state, x, y)
      for leaf in jax.tree.leaves((u, state.stored)):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_state_is_a_plain_pytree_and_resumes_bit_for_bit():
  tx = COMPOSITIONS["arsam+top1"][0]()
  p, x, y = setup(0)
  params = to_jax(p)
  step = jax.jit(optax_sam.make_update(tx, jax_loss))
  state = tx.init(params)
  for _ in range(3):
    _, u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
  # A host round trip (as a checkpoint would do) and three more steps.
  saved = jax.tree.map(np.asarray, (params, state))
  restored = jax.tree.map(jnp.asarray, saved)
  runs = []
  for q, s in ((params, state), restored):
    for _ in range(3):
      _, u, s = step(q, s, x, y)
      q = optax.apply_updates(q, u)
    runs.append(q)
  jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(unselected="middle"), ValueError, "unselected"),
    (dict(policy="top2"), TypeError, "policy"),
    (dict(schedule=4), TypeError, "schedule"),
    (dict(mixer="psf", schedule=schedules.recompute_every(2)), TypeError,
     "mixer"),
    (dict(alpha=2.0), ValueError, "alpha"),
    (dict(rho=float("inf")), ValueError, "rho"),
    (dict(executor="fast"), ValueError, "executor"),
])
def test_bad_input_raises(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_sam.sharpness_aware(optax.sgd(0.1), **kwargs)


def test_deprecated_names_warn_and_still_work():
  p, x, y = setup(0)
  with pytest.warns(DeprecationWarning, match="sharpness_aware"):
    old = optax_sam.selective_sam(optax.sgd(LR), optax_sam.policies.top_k(1))
  new = optax_sam.sharpness_aware(optax.sgd(LR), policy=policies.top_k(1),
                                  unselected="perturbed")
  a, _, _, _ = _run(old, 3)
  b, _, _, _ = _run(new, 3)
  for u, v in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, u, v)
  with pytest.warns(DeprecationWarning, match="optax_sam.policies.top_k"):
    assert optax_sam.top_k is policies.top_k
  with pytest.warns(DeprecationWarning, match="schedules.recompute_every"):
    assert optax_sam.recompute_every is schedules.recompute_every
  with pytest.warns(DeprecationWarning):
    assert optax_sam.ReuseState is optax_sam.SharpnessAwareState
  with pytest.warns(DeprecationWarning, match="every"):
    schedules.recompute_every(k=2)
  with pytest.raises(AttributeError):
    optax_sam.no_such_name  # pylint: disable=pointless-statement


def test_pass_coverage_fields():
  """clean_active + perturbed_active: SAM 1 + 1; layer-wise SAM's clean
  pass covers every leaf (unselected='clean'), its perturbed pass the
  selection; a reuse step has no perturbed pass."""
  params, loss, x, y = _cov_problem()
  sizes = np.array([np.size(v) for v in jax.tree.leaves(params)], float)
  last = sizes[-2:].sum() / sizes.sum()  # the output layer's w and b
  cases = [
      (optax_sam.sam(optax.sgd(0.1)), [(1.0, 1.0)] * 2),
      (optax_sam.sam(optax.sgd(0.1), policy=optax_sam.policies.fixed([-1])),
       [(1.0, last)] * 2),
      (optax_sam.sam(optax.sgd(0.1), policy=optax_sam.policies.fixed([-1]),
                     unselected="zero"), [(last, last)] * 2),
      (optax_sam.sam(optax.sgd(0.1),
                     schedule=optax_sam.schedules.recompute_every(2)),
       [(1.0, 1.0), (1.0, 0.0)]),
  ]
  for tx, want in cases:
    state = tx.init(params)
    step = jax.jit(optax_sam.make_update(tx, loss))
    for w in want:
      _, _, state = step(params, state, x, y)
      np.testing.assert_allclose(
          [state.clean_active, state.perturbed_active], w, rtol=1e-6)


def _cov_problem():
  from benchmarks import cost as cost_lib  # pylint: disable=g-import-not-at-top
  params, loss, x = cost_lib.deep_tanh_mlp(3, 8, 16)
  return params, loss, x, jnp.sin(x)
