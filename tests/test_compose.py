"""Composition with optax: chains, schedules, inject_hyperparams, MultiSteps,
extra arguments, and clear errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import selective, assert_trees_close, jax_loss, setup, to_jax


def _c2_steps(tx, params, x, y, steps=3, **extra):
  step = jax.jit(optax_sam.make_update(tx, jax_loss))
  state = tx.init(params)
  for _ in range(steps):
    _, u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
  return params, state


def test_chain_base_optimizer_with_clipping():
  p, x, y = setup()
  params = to_jax(p)
  base = optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(0.1))
  tx = optax_sam.sam(base, rho=0.05)
  got, _ = _c2_steps(tx, params, x, y, steps=1)
  g = reference.sam_gradient(p, [(x, y)], 0.05)
  norm = reference.global_norm(g)
  want = reference.tmap(lambda a, b: a - 0.1 * b * min(1.0, 0.01 / norm),
                        p, g)
  assert_trees_close(got, want)


def test_rho_schedule_matches_constant_rhos():
  p, x, y = setup()
  params = to_jax(p)
  sched = lambda count: jnp.where(count < 1, 0.05, 0.2)
  tx = optax_sam.sam(optax.sgd(0.1), rho=sched)
  got, _ = _c2_steps(tx, params, x, y, steps=2)
  q = p
  for rho in (0.05, 0.2):
    g = reference.sam_gradient(q, [(x, y)], rho)
    q = reference.tmap(lambda a, b: a - 0.1 * b, q, g)
  assert_trees_close(got, q)


def test_inject_hyperparams_rho_and_learning_rate():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax.inject_hyperparams(optax_sam.sam)(
      optimizer=optax.inject_hyperparams(optax.sgd)(
          learning_rate=optax.linear_schedule(0.1, 0.05, 1)),
      rho=lambda count: 0.05 * (count + 1))
  got, state = _c2_steps(tx, params, x, y, steps=2)
  q = p
  for lr, rho in ((0.1, 0.05), (0.05, 0.1)):
    g = reference.sam_gradient(q, [(x, y)], rho)
    q = reference.tmap(lambda a, b: a - lr * b, q, g)
  assert_trees_close(got, q)
  np.testing.assert_allclose(state.hyperparams["rho"], 0.1, rtol=1e-6)


@pytest.mark.parametrize("factory, kwargs", [
    (optax_sam.sam, {}),
    (optax_sam.asam, {"eta": 0.02}),
    (optax_sam.layerwise_sam, {"num_layers": 1, "every": 1, "ema": 0.5,
                               "alpha": 0.5}),
    (optax_sam.layerwise_sam, {
        "num_layers": 1, "every": 2,
        "schedule": optax_sam.schedules.recompute_every(2)}),
    (optax_sam.sharpness_aware, {"policy": optax_sam.policies.top_k(1)}),
    (optax_sam.sharpness_aware, {"policy": optax_sam.policies.random_k(1),
                                 "seed": 2, "unselected": "zero"}),
    (optax_sam.arsam, {"decay": 0.5}),
    (optax_sam.arsam, {"policy": optax_sam.policies.top_k(1)}),
    (optax_sam.looksam, {"every": 2, "alpha": 0.5}),
], ids=["sam", "asam", "layerwise_sam", "layerwise_sam_reuse",
        "policy_top_k", "policy_random_k", "arsam", "arsam_top_k",
        "looksam"])
def test_every_factory_works_under_inject_hyperparams(factory, kwargs):
  # No static_args: integer and checked arguments arrive as (traced) arrays.
  p, x, y = setup()
  params = to_jax(p)
  injected = optax.inject_hyperparams(factory)(optax.sgd(0.1), rho=0.05,
                                               **kwargs)
  got, state = _c2_steps(injected, params, x, y, steps=2)
  want, _ = _c2_steps(factory(optax.sgd(0.1), rho=0.05, **kwargs), params,
                      x, y, steps=2)
  assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
  assert "rho" in state.hyperparams


def test_inject_hyperparams_still_checks_arguments_at_init():
  params = to_jax(setup()[0])
  for factory, kwargs, match in [
      (optax_sam.layerwise_sam, {"num_layers": 0}, "num_layers"),
      (optax_sam.layerwise_sam, {"alpha": 1.5}, "alpha"),
      (optax_sam.asam, {"eta": -1.0}, "eta"),
      (optax_sam.looksam, {"every": 0}, "every must"),
      (optax_sam.sam, {"rho": -0.1}, "rho")]:
    tx = optax.inject_hyperparams(factory)(optax.sgd(0.1), **kwargs)
    with pytest.raises(ValueError, match=match):
      tx.init(params)


def test_multisteps_as_base_accumulates_sam_gradients():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.sam(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2))
  step = jax.jit(optax_sam.make_update(tx, jax_loss))
  state = tx.init(params)
  halves = [(x[:8], y[:8]), (x[8:], y[8:])]
  for xb, yb in halves:
    _, u, state = step(params, state, xb, yb)
    params = optax.apply_updates(params, u)
  g = reference.sam_gradient(p, halves, 0.05)  # per-micro-batch SAM, mean
  want = reference.tmap(lambda a, b: a - 0.1 * b, p, g)
  assert_trees_close(params, want)


def test_extra_args_are_passed_to_the_base_optimizer():
  p, x, y = setup()
  params = to_jax(p)
  base = optax.chain(optax.sgd(0.1),
                     optax.contrib.reduce_on_plateau(patience=0, factor=0.5))
  tx = optax_sam.sam(base)
  state = tx.init(params)
  g = jax.grad(jax_loss)(params, x, y)
  gf = lambda q, i: jax.grad(jax_loss)(q, x, y)
  for value in (1.0, 2.0, 3.0):  # a worsening loss halves the scale
    _, state = tx.update(g, state, params, grad_fn=gf, value=value)
  scale = state.opt_state[1].scale
  assert float(scale) < 1.0


def test_state_is_a_plain_pytree_and_resumes_bit_for_bit():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.sam(optax.adamw(1e-2), rho=lambda c: 0.05 + 0.01 * c)
  step = jax.jit(optax_sam.make_update(tx, jax_loss))

  def run(params, state, n):
    for _ in range(n):
      _, u, state = step(params, state, x, y)
      params = optax.apply_updates(params, u)
    return params, state

  full = run(params, tx.init(params), 4)
  half = run(params, tx.init(params), 2)
  # "Checkpoint": flatten to numpy and rebuild, as orbax would.
  leaves, treedef = jax.tree.flatten(half)
  restored = jax.tree.unflatten(treedef, [np.array(x) for x in leaves])
  resumed = run(*restored, 2)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), full,
               resumed)
  for leaf in jax.tree.leaves(full[1]):
    assert isinstance(leaf, jax.Array)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("rho", [0.0, -0.1, float("nan")])
@pytest.mark.parametrize("factory", [optax_sam.sam, optax_sam.asam])
def test_bad_rho_raises_at_construction(factory, rho):
  with pytest.raises(ValueError, match="rho must be > 0"):
    factory(optax.sgd(0.1), rho=rho)


@pytest.mark.parametrize("rho", [float("inf"), float("-inf"), float("nan"),
                                 np.float32("inf"), jnp.asarray(jnp.nan)])
@pytest.mark.parametrize("factory", [
    optax_sam.sam, optax_sam.asam, optax_sam.layerwise_sam, optax_sam.arsam,
    optax_sam.looksam,
    lambda opt, rho: selective(opt, optax_sam.policies.top_k(1),
                                             rho=rho),
], ids=["sam", "asam", "layerwise_sam", "arsam", "looksam", "selective_sam"])
def test_non_finite_rho_raises_at_construction(factory, rho):
  with pytest.raises(ValueError, match="rho must be > 0 and finite"):
    factory(optax.sgd(0.1), rho=rho)


def test_schedule_radius_that_is_not_finite_or_negative_means_no_ascent():
  p, x, y = setup()
  params = to_jax(p)
  radii = jnp.asarray([jnp.nan, jnp.inf, -0.1, 0.05])
  tx = optax_sam.sam(optax.sgd(0.1), rho=lambda count: radii[count])
  got, _ = _c2_steps(tx, params, x, y, steps=4)
  q = p
  for rho in (0.0, 0.0, 0.0, 0.05):  # the bad radii give SGD steps
    g = (reference.loss_and_grad(q, x, y)[1] if rho == 0.0 else
         reference.sam_gradient(q, [(x, y)], rho))
    q = reference.tmap(lambda a, b: a - 0.1 * b, q, g)
  assert_trees_close(got, q)


def test_injected_rho_set_to_nan_at_run_time_means_no_ascent():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax.inject_hyperparams(optax_sam.sam)(optax.sgd(0.1), rho=0.05)
  state = tx.init(params)
  state.hyperparams["rho"] = jnp.asarray(jnp.nan)
  _, u, _ = jax.jit(optax_sam.make_update(tx, jax_loss))(params, state, x, y)
  g = reference.loss_and_grad(p, x, y)[1]
  assert_trees_close(u, reference.tmap(lambda b: -0.1 * b, g))


def test_mismatched_perturb_mask_raises():
  params = to_jax(setup()[0])
  tx = optax_sam.sam(optax.sgd(0.1), mask={"out": True})
  with pytest.raises(ValueError, match="same tree structure"):
    optax_sam.make_update(tx, jax_loss)(params, tx.init(params), 0, 0)


def test_empty_perturb_mask_raises():
  params = to_jax(setup()[0])
  mask = jax.tree.map(lambda _: False, params)
  tx = optax_sam.sam(optax.sgd(0.1), mask=mask)
  with pytest.raises(ValueError, match="selects no parameter"):
    optax_sam.make_update(tx, jax_loss)(params, tx.init(params), 0, 0)


def test_mismatched_gradient_pytree_raises():
  params = to_jax(setup()[0])
  tx = optax_sam.sam(optax.sgd(0.1))
  with pytest.raises(ValueError, match="same tree structure"):
    tx.update({"out": params["out"]}, tx.init(params), params,
              grad_fn=lambda q, i: q)


def test_missing_grad_fn_raises():
  params = to_jax(setup()[0])
  tx = optax_sam.sam(optax.sgd(0.1))
  with pytest.raises(ValueError, match="needs grad_fn"):
    tx.update(params, tx.init(params), params)


def test_missing_params_raises():
  params = to_jax(setup()[0])
  tx = optax_sam.sam(optax.sgd(0.1))
  with pytest.raises(ValueError, match="need params"):
    tx.update(params, tx.init(params), None, grad_fn=lambda q, i: q)


def test_bad_loss_fn_and_plain_optimizer_in_make_update():
  params = to_jax(setup()[0])
  with pytest.raises(ValueError, match="loss_fn must be callable"):
    optax_sam.make_update(optax_sam.sam(optax.sgd(0.1)), None)
  tx = optax.sgd(0.1)
  with pytest.raises(TypeError, match="optax_sam.plain"):
    optax_sam.make_update(tx, jax_loss)(params, tx.init(params), 0, 0)


def _int_params():
  return jax.tree.map(lambda v: v.astype(jnp.int32), to_jax(setup()[0]))


@pytest.mark.parametrize("loss_fn, has_aux, params, error, match", [
    (lambda q, a, b: jax_loss(q, a, b) + "oops", False, None, TypeError,
     "unsupported operand"),
    (lambda q, a, b: q.hidden, False, None, AttributeError,
     "no attribute 'hidden'"),
    (lambda q, a, b: jnp.square(q["out"]["b"]), False, None, TypeError,
     "scalar-output"),
    (jax_loss, True, None, TypeError, "aux output"),
    (lambda q, a, b: (jax_loss(q, a, b), 0.0), False, None, TypeError,
     "scalar-output"),
    (lambda q, a, b: jnp.sum(q["out"]["w"]).astype(jnp.float32), False,
     _int_params, TypeError, "real- or complex-valued"),
], ids=["loss_bug", "attribute", "non_scalar", "aux_missing",
        "aux_unexpected", "int_leaves"])
@pytest.mark.parametrize("make_tx", [
    lambda: optax_sam.sam(optax.sgd(0.1)),
    lambda: selective(optax.sgd(0.1), optax_sam.policies.top_k(1)),
    lambda: optax_sam.looksam(optax.sgd(0.1), every=2),
], ids=["sam", "selective_sam", "looksam"])
def test_errors_inside_a_pass_are_not_reported_as_undriven(
    make_tx, loss_fn, has_aux, params, error, match):
  p, x, y = setup()
  params = to_jax(p) if params is None else params()
  tx = make_tx()
  with pytest.raises(error, match=match) as info:
    optax_sam.make_update(tx, loss_fn, has_aux=has_aux)(
        params, tx.init(params), x, y)
  assert "optax_sam.plain" not in str(info.value)


def test_sync_ascent_needs_axis_name():
  with pytest.raises(ValueError, match="axis_name"):
    optax_sam.sam(optax.sgd(0.1), sync_ascent=True)
