"""Layer-wise adaptive gradient-norm penalizing (layerwise_sam / lagnp)."""

import re

import jax
import numpy as np
import optax
import pytest

import optax_sam
import reference
from optax_sam._src import engine, layerwise

from _util import (assert_trees_close, deep_mlp, flops, jax_loss, run_steps,
                   setup, to_jax)

LR, MOM, RHO = 0.1, 0.9, 0.05
LAYERS = ("hidden", "out")


def _run(tx, p, x, y, steps, path="c2", jit=True):
  """Params after each step, the names of the layers each step perturbed,
  and the last state."""
  out, states = run_steps(tx, to_jax(p), lambda s: [(x, y)], path, steps,
                          jit)
  sels = [tuple(n for n, f in zip(LAYERS, np.asarray(s.last_selection)) if f)
          for s in states]
  return out, sels, states[-1]


@pytest.mark.parametrize("alpha, every, path, jit, unselected", [
    (1.0, 1, "c2", True, "clean"), (1.0, 2, "c1", True, "clean"),
    (0.5, 2, "c2", False, "clean"), (0.3, 3, "c2", True, "clean"),
    (1.0, 1, "c2", True, "perturbed"), (0.5, 2, "c1", False, "perturbed"),
    (1.0, 1, "c2", True, "zero")])
def test_matches_numpy_reference(alpha, every, path, jit, unselected):
  p, x, y = setup(0)
  tx = optax_sam.layerwise_sam(optax.sgd(LR, momentum=MOM), rho=RHO,
                               num_layers=1, every=every, alpha=alpha,
                               unselected=unselected)
  got, sels, _ = _run(tx, p, x, y, 7, path, jit)
  want, want_sels = reference.run_top_k_momentum(
      p, x, y, 7, LR, MOM, RHO, 1, interval=every, alpha=alpha,
      unselected=unselected)
  assert sels == want_sels
  if unselected != "zero":  # top_k never sees an unselected layer's norm
    assert len(set(want_sels)) > 1, "the selection should change"
  for a, b in zip(got, want):
    assert_trees_close(a, b, rtol=2e-5, atol=2e-6)


def test_all_layers_is_sam_exactly():
  p, x, y = setup(1)
  lw = optax_sam.lagnp(optax.sgd(LR, momentum=MOM), rho=RHO, num_layers=2,
                       every=1)
  sam = optax_sam.sam(optax.sgd(LR, momentum=MOM), rho=RHO)
  a, _, _ = _run(lw, p, x, y, 5)
  params, state = to_jax(p), sam.init(to_jax(p))
  step = jax.jit(optax_sam.make_update(sam, jax_loss))
  for got in a:
    _, u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
    assert_trees_close(got, params, rtol=1e-6, atol=1e-7)


def test_adamw_base_and_zero_gradient():
  p, x, y = setup(0)
  tx = optax_sam.layerwise_sam(optax.adamw(1e-3, weight_decay=1e-2),
                               num_layers=1)
  params = to_jax(p)
  state = tx.init(params)
  zero_loss = lambda q, xb, yb: 0.0 * jax_loss(q, xb, yb)
  (_, _), u, state = jax.jit(optax_sam.make_update(tx, zero_loss))(
      params, state, x, y)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(u))


def test_output_side_selection_costs_about_one_sgd_step():
  depth, width = 8, 64
  params, loss, x, _ = deep_mlp(depth, width, 64, 8)

  def step_flops(tx, **kw):
    fn = optax_sam.make_update(tx, loss)
    return flops(lambda p, s, a, b: fn(p, s, a, b, **kw), params,
                 tx.init(params), x, x)

  sgd = step_flops(optax_sam.plain(optax.sgd(0.1)))
  sam = step_flops(optax_sam.sam(optax.sgd(0.1)))
  lw = optax_sam.layerwise_sam(optax.sgd(0.1), num_layers=1,
                               executor="specialize")
  last = step_flops(lw, static_selection=(False,) * (depth - 1) + (True,))
  assert last < 1.2 * sgd
  assert sam > 1.9 * sgd


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=0), "num_layers"), (dict(every=0), "every"),
    (dict(alpha=1.5), "alpha"), (dict(rho=-0.1), "rho")])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_sam.layerwise_sam(optax.sgd(0.1), **kwargs)


def test_too_many_layers_errors_at_init():
  tx = optax_sam.layerwise_sam(optax.sgd(0.1), num_layers=3)
  with pytest.raises(ValueError, match="k must be"):
    tx.init(to_jax(setup(0)[0]))


def test_the_kdd_paper_is_cited_with_one_year():
  years = set()
  for module in (layerwise, engine):
    found = re.findall(r"2503\.14205>`_, KDD (\d{4})", module.__doc__)
    assert found, module.__name__
    years.update(found)
  assert years == {"2024"}


def test_interval_is_a_deprecated_name_of_every():
  p, x, y = setup(0)
  with pytest.warns(DeprecationWarning, match="every"):
    old = optax_sam.layerwise_sam(optax.sgd(LR), num_layers=1, interval=2)
  new = optax_sam.layerwise_sam(optax.sgd(LR), num_layers=1, every=2)
  a, sa, _ = _run(old, p, x, y, 4)
  b, sb, _ = _run(new, p, x, y, 4)
  assert sa == sb
  for u, v in zip(a, b):
    assert_trees_close(u, v, rtol=0, atol=0)
  with pytest.raises(TypeError, match="both"):
    optax_sam.layerwise_sam(optax.sgd(LR), every=2, interval=2)
