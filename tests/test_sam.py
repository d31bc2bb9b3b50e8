"""SAM / ASAM update rules against independent references, both call paths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import (assert_trees_close, jax_loss, rolling_batches, run_steps,
                   setup, to_jax)

LR, MOM, STEPS = 0.1, 0.9, 4


def _run(tx, params, x, y, path, jit=True):
  """The params after each of STEPS steps of ``tx`` via C1 or C2."""
  return run_steps(tx, params, rolling_batches(x, y), path, STEPS, jit)[0]


@pytest.mark.parametrize("path", ["c1", "c2"])
@pytest.mark.parametrize("jit", [True, False])
def test_sam_matches_numpy_reference(path, jit):
  p, x, y = setup()
  tx = optax_sam.sam(optax.sgd(LR, momentum=MOM), rho=0.05)
  got = _run(tx, to_jax(p), x, y, path, jit)
  want = reference.run_sam_momentum(p, rolling_batches(x, y), STEPS, LR, MOM,
                                    0.05)
  for g, w in zip(got, want):
    assert_trees_close(g, w)


@pytest.mark.parametrize("path", ["c1", "c2"])
def test_asam_matches_numpy_reference(path):
  p, x, y = setup()
  tx = optax_sam.asam(optax.sgd(LR, momentum=MOM), rho=0.5, eta=0.01)
  got = _run(tx, to_jax(p), x, y, path)
  want = reference.run_sam_momentum(p, rolling_batches(x, y), STEPS, LR, MOM,
                                    0.5, asam_eta=0.01)
  for g, w in zip(got, want):
    assert_trees_close(g, w)


@pytest.mark.parametrize("path", ["c1", "c2"])
@pytest.mark.parametrize("layers", [("out",), ("hidden",)])
def test_partial_perturbation_matches_reference(path, layers):
  p, x, y = setup()
  params = to_jax(p)
  mask = optax_sam.layer_groups(params).mask(layers)
  tx = optax_sam.sam(optax.sgd(LR, momentum=MOM), rho=0.1, mask=mask)
  got = _run(tx, params, x, y, path)
  want = reference.run_sam_momentum(p, rolling_batches(x, y), STEPS, LR, MOM,
                                    0.1, layers=layers)
  for g, w in zip(got, want):
    assert_trees_close(g, w)


def test_perturb_as_callable_and_per_layer_normalization():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.sam(optax.sgd(LR, momentum=MOM), rho=0.1, per_layer=True,
                     mask=lambda ps: jax.tree.map(lambda _: True, ps))
  got = _run(tx, params, x, y, "c2")
  want = reference.run_sam_momentum(p, rolling_batches(x, y), STEPS, LR, MOM,
                                    0.1, per_layer=True)
  for g, w in zip(got, want):
    assert_trees_close(g, w)


@pytest.mark.parametrize("path", ["c1", "c2"])
def test_matches_optax_contrib_sam_opaque(path):
  p, x, y = setup(3)
  params = to_jax(p)
  rho = 0.05
  ref_tx = optax.contrib.sam(
      optax.sgd(LR, momentum=MOM),
      optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2, opaque_mode=True)
  ref_state = ref_tx.init(params)
  ref_params = params

  @jax.jit
  def ref_step(q, st, xb, yb):
    g = jax.grad(jax_loss)(q, xb, yb)
    return ref_tx.update(g, st, q,
                         grad_fn=lambda r, i: jax.grad(jax_loss)(r, xb, yb))

  got = _run(optax_sam.sam(optax.sgd(LR, momentum=MOM), rho=rho),
             params, x, y, path)
  for s in range(STEPS):
    xb, yb = (jnp.asarray(a) for a in rolling_batches(x, y)(s)[0])
    u, ref_state = ref_step(ref_params, ref_state, xb, yb)
    ref_params = optax.apply_updates(ref_params, u)
    assert_trees_close(got[s], ref_params, rtol=1e-5, atol=1e-7)


def test_c2_returns_clean_loss_and_aux():
  p, x, y = setup()
  params = to_jax(p)

  def loss_aux(q, xb, yb):
    loss = jax_loss(q, xb, yb)
    return loss, {"loss_again": loss, "w_sum": jnp.sum(q["out"]["w"])}

  tx = optax_sam.sam(optax.sgd(LR), rho=0.3)
  step = jax.jit(optax_sam.make_update(tx, loss_aux, has_aux=True))
  (loss, aux), _, _ = step(params, tx.init(params), x, y)
  want_loss, _ = reference.loss_and_grad(p, x, y)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(aux["loss_again"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(aux["w_sum"], p["out"]["w"].sum(), rtol=1e-5)


def test_plain_equals_base_optimizer():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.plain(optax.sgd(LR, momentum=MOM))
  step = jax.jit(optax_sam.make_update(tx, jax_loss))
  (loss, aux), u, _ = step(params, tx.init(params), x, y)
  assert aux is None
  base = optax.sgd(LR, momentum=MOM)
  u_ref, _ = base.update(jax.grad(jax_loss)(params, x, y), base.init(params))
  assert_trees_close(u, u_ref, rtol=1e-6)
  np.testing.assert_allclose(loss, jax_loss(params, x, y), rtol=1e-6)


@pytest.mark.parametrize("factory", [optax_sam.sam, optax_sam.asam])
@pytest.mark.parametrize("path", ["c1", "c2"])
def test_zero_and_tiny_gradients_stay_finite(factory, path):
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  zero_loss = lambda q, *_: 0.0 * jnp.sum(q["w"]) + 0.0 * q["b"]
  tiny_loss = lambda q, *_: 1e-30 * jnp.sum(q["w"]) + 1e-30 * q["b"]
  for loss_fn in (zero_loss, tiny_loss):
    tx = factory(optax.sgd(0.1))
    state = tx.init(params)
    if path == "c2":
      _, u, _ = jax.jit(optax_sam.make_update(tx, loss_fn))(params, state)
    else:
      g = jax.grad(loss_fn)(params)
      u, _ = tx.update(g, state, params, grad_fn=lambda q, i: jax.grad(
          loss_fn)(q))
    for leaf in jax.tree.leaves(u):
      assert np.all(np.isfinite(np.asarray(leaf)))


def test_tiny_gradient_direction_is_kept():
  g = {"w": jnp.array([3e-30, 4e-30], jnp.float32)}
  eps, _ = optax_sam.sam_perturbation(1.0).update(
      g, optax_sam.sam_perturbation(1.0).init(g))
  np.testing.assert_allclose(eps["w"], [0.6, 0.8], rtol=1e-5)


@pytest.mark.parametrize("factory", [optax_sam.sam, optax_sam.asam])
def test_bf16_params_keep_dtype(factory):
  p, x, y = setup()
  params = to_jax(p, jnp.bfloat16)
  tx = factory(optax.sgd(LR, momentum=MOM))
  step = jax.jit(optax_sam.make_update(
      tx, lambda q, xb, yb: jax_loss(q, xb, yb).astype(jnp.float32)))
  (loss, _), u, state = step(params, tx.init(params),
                             x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
  for leaf in jax.tree.leaves(u):
    assert leaf.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  new = optax.apply_updates(params, u)
  chex.assert_trees_all_equal_dtypes(new, params)


def test_no_recompilation_after_first_call():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.sam(optax.sgd(LR, momentum=MOM))
  step = jax.jit(chex.assert_max_traces(
      optax_sam.make_update(tx, jax_loss), n=1))
  state = tx.init(params)
  for _ in range(3):
    _, u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
