"""Compiled-cost structure: restricted passes really compile to less work.

These tests read FLOPs from ``jax.jit(f).lower(...).compile().cost_analysis()``
so they are deterministic tests of program structure, not of speed.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_sam
from _util import deep_mlp, flops

DEPTH, WIDTH, BATCH = 8, 128, 64


@pytest.fixture(scope="module")
def mlp():
  params, loss, x, y = deep_mlp(DEPTH, WIDTH, BATCH, scale=12)
  sgd_grad = flops(jax.grad(loss), params, x, y)
  return params, loss, x, y, sgd_grad


def _step_ratio(mlp, tx):
  params, loss, x, y, sgd_grad = mlp
  step = optax_sam.make_update(tx, loss)
  return flops(step, params, tx.init(params), x, y) / sgd_grad


def test_plain_step_costs_one_gradient(mlp):
  assert 0.98 < _step_ratio(mlp, optax_sam.plain(optax.sgd(0.1))) < 1.05


def test_full_sam_costs_two_gradients(mlp):
  assert 1.95 < _step_ratio(mlp, optax_sam.sam(optax.sgd(0.1))) < 2.1
  assert 1.95 < _step_ratio(mlp, optax_sam.asam(optax.sgd(0.1))) < 2.1


def test_last_layer_sam_costs_about_one_gradient(mlp):
  params = mlp[0]
  mask = optax_sam.layer_groups(params).mask([-1])
  ratio = _step_ratio(mlp, optax_sam.sam(optax.sgd(0.1), mask=mask))
  assert ratio <= 1.15


def test_middle_layer_sam_costs_in_between(mlp):
  params = mlp[0]
  groups = optax_sam.layer_groups(params)
  last = _step_ratio(mlp, optax_sam.sam(optax.sgd(0.1),
                                        mask=groups.mask([-1])))
  mid = _step_ratio(mlp, optax_sam.sam(optax.sgd(0.1),
                                       mask=groups.mask([DEPTH // 2])))
  first = _step_ratio(mlp, optax_sam.sam(optax.sgd(0.1),
                                         mask=groups.mask([0])))
  assert last < mid < first <= 2.1
  assert 1.2 < mid < 1.8


def test_c1_inside_jit_is_pruned_too(mlp):
  params, loss, x, y, sgd_grad = mlp
  mask = optax_sam.layer_groups(params).mask([-1])
  tx = optax_sam.sam(optax.sgd(0.1), mask=mask)

  def c1(p, st, xb, yb):
    g = jax.grad(loss)(p, xb, yb)
    return tx.update(g, st, p, grad_fn=lambda q, i: jax.grad(loss)(q, xb, yb))

  assert flops(c1, params, tx.init(params), x, y) / sgd_grad <= 1.15


def test_masking_a_full_gradient_saves_nothing(mlp):
  """The counter-example that motivates the design: a 0/1 mask on a full
  gradient still pays for the full gradient."""
  params, loss, x, y, sgd_grad = mlp
  mask = optax_sam.layer_groups(params).mask([-1])
  fmask = jax.tree.map(float, mask)

  def masked_sam(p, xb, yb):
    g = jax.tree.map(lambda a, m: a * m, jax.grad(loss)(p, xb, yb), fmask)
    eps = jax.tree.map(lambda a: 0.05 * a / optax.tree.norm(g), g)
    return jax.grad(loss)(jax.tree.map(jnp.add, p, eps), xb, yb)

  assert flops(masked_sam, params, x, y) / sgd_grad > 1.9
