"""Layer-wise adaptive gradient-norm penalizing (layerwise_sam / lagnp)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import assert_trees_close, jax_loss, setup, to_jax, deep_mlp, make_step

LR, MOM, RHO = 0.1, 0.9, 0.05
LAYERS = ("hidden", "out")


def _np_layerwise(p, x, y, steps, k, interval, alpha):
  """Independent reference: top-k layers by the norm of the applied
  gradient, re-selected after every ``interval`` steps; SAM on those."""
  p = reference.tmap(lambda a: a.astype(np.float64), p)
  trace = reference.tmap(np.zeros_like, p)
  selected = LAYERS[len(LAYERS) - k:]
  out, sels = [], []
  for t in range(steps):
    sels.append(tuple(selected))
    _, g = reference.loss_and_grad(p, x, y)
    eps = reference.sam_eps(g, RHO, layers=selected)
    _, g_adv = reference.loss_and_grad(reference.tmap(np.add, p, eps), x, y)
    final = {n: {m: ((1 - alpha) * g[n][m] + alpha * g_adv[n][m]
                     if n in selected else g_adv[n][m]) for m in g[n]}
             for n in g}
    if (t + 1) % interval == 0:
      norms = [np.sqrt(sum(np.sum(v ** 2) for v in final[n].values()))
               for n in LAYERS]
      best = sorted(range(len(LAYERS)), key=lambda i: (norms[i], i))
      selected = tuple(LAYERS[i] for i in sorted(best[len(LAYERS) - k:]))
    trace = reference.tmap(lambda gg, tr: gg + MOM * tr, final, trace)
    p = reference.tmap(lambda a, tr: a - LR * tr, p, trace)
    out.append(p)
  return out, sels


def _run(tx, p, x, y, steps, path="c2", jit=True):
  params, state = to_jax(p), tx.init(to_jax(p))
  step = make_step(tx, path, jit)
  out, sels = [], []
  for _ in range(steps):
    _, u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
    out.append(params)
    sels.append(tuple(n for n, f in zip(LAYERS,
                                        np.asarray(state.last_selection))
                      if f))
  return out, sels, state


@pytest.mark.parametrize("alpha, interval, path, jit", [
    (1.0, 1, "c2", True), (1.0, 2, "c1", True), (0.5, 2, "c2", False),
    (0.3, 3, "c2", True)])
def test_matches_numpy_reference(alpha, interval, path, jit):
  p, x, y = setup(0)
  tx = optax_sam.layerwise_sam(optax.sgd(LR, momentum=MOM), rho=RHO,
                               num_layers=1, interval=interval, alpha=alpha)
  got, sels, _ = _run(tx, p, x, y, 7, path, jit)
  want, want_sels = _np_layerwise(p, x, y, 7, 1, interval, alpha)
  assert sels == want_sels
  assert len(set(want_sels)) > 1, "the selection should change"
  for a, b in zip(got, want):
    assert_trees_close(a, b, rtol=2e-5, atol=2e-6)


def test_all_layers_is_sam_exactly():
  p, x, y = setup(1)
  lw = optax_sam.lagnp(optax.sgd(LR, momentum=MOM), rho=RHO, num_layers=2,
                       interval=1)
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

  def flops(tx, **kw):
    fn = optax_sam.make_update(tx, loss)
    ca = jax.jit(lambda p, s, a, b: fn(p, s, a, b, **kw)).lower(
        params, tx.init(params), x, x).compile().cost_analysis()
    return (ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"]

  sgd = flops(optax_sam.plain(optax.sgd(0.1)))
  sam = flops(optax_sam.sam(optax.sgd(0.1)))
  lw = optax_sam.layerwise_sam(optax.sgd(0.1), num_layers=1,
                               executor="specialize")
  last = flops(lw, static_selection=(False,) * (depth - 1) + (True,))
  assert last < 1.2 * sgd
  assert sam > 1.9 * sgd


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=0), "num_layers"), (dict(interval=0), "interval"),
    (dict(alpha=1.5), "alpha"), (dict(rho=-0.1), "rho")])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_sam.layerwise_sam(optax.sgd(0.1), **kwargs)


def test_too_many_layers_errors_at_init():
  tx = optax_sam.layerwise_sam(optax.sgd(0.1), num_layers=3)
  with pytest.raises(ValueError, match="k must be"):
    tx.init(to_jax(setup(0)[0]))


def test_the_kdd_paper_is_cited_with_one_year():
  import re  # pylint: disable=g-import-not-at-top
  from optax_sam._src import layerwise, selective  # pylint: disable=g-import-not-at-top
  years = set()
  for module in (layerwise, selective):
    found = re.findall(r"2503\.14205>`_, KDD (\d{4})", module.__doc__)
    assert found, module.__name__
    years.update(found)
  assert years == {"2024"}
