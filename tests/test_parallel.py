"""Data parallelism on 8 simulated CPU devices (see conftest.py)."""

import functools

import jax
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import (assert_trees_close, device_data, jax_loss, make_step,
                   replicate, shard_map_train, shards, stack, to_jax)

LR = 0.1


@pytest.fixture(scope="module")
def data():
  return device_data()


def _reference(p, x, y, steps, **kw):
  q = p
  for _ in range(steps):
    g = reference.sam_gradient(q, shards(x, y), 0.05, **kw)
    q = reference.tmap(lambda a, b: a - LR * b, q, g)
  return q


@pytest.mark.parametrize("sync_ascent", [False, True])
@pytest.mark.parametrize("path", ["c1", "c2"])
def test_pmap_m_sharpness(data, sync_ascent, path):
  p, x, y = data
  tx = optax_sam.sam(optax.sgd(LR), rho=0.05, axis_name="dev",
                     sync_ascent=sync_ascent)
  step = make_step(tx, path, jit=False)

  @functools.partial(jax.pmap, axis_name="dev")
  def train(q, st, xb, yb):
    for _ in range(2):
      _, u, st = step(q, st, xb, yb)
      q = optax.apply_updates(q, u)
    return q

  params = to_jax(p)
  rep = replicate(params)
  st = replicate(tx.init(params))
  out = train(rep, st, stack(x), stack(y))
  for leaf in jax.tree.leaves(out):  # replicas stay identical
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  want = _reference(p, x, y, 2, sync_ascent=sync_ascent)
  assert_trees_close(jax.tree.map(lambda a: a[0], out), want)


def test_m_sharpness_differs_from_synced_ascent(data):
  p, x, y = data
  a = _reference(p, x, y, 1, sync_ascent=False)
  b = _reference(p, x, y, 1, sync_ascent=True)
  assert np.max(np.abs(a["out"]["w"] - b["out"]["w"])) > 1e-6


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("factory", [optax_sam.sam, optax_sam.asam])
def test_shard_map(data, factory, check_vma):
  p, x, y = data
  kw = {"rho": 0.05} if factory is optax_sam.sam else {"rho": 0.05,
                                                        "eta": 0.01}
  tx = factory(optax.sgd(LR), axis_name="dev", **kw)
  train = shard_map_train(optax_sam.make_update(tx, jax_loss),
                          check_vma=check_vma)
  params = to_jax(p)
  out = train(params, tx.init(params), stack(x), stack(y))
  eta = 0.01 if factory is optax_sam.asam else None
  want = _reference(p, x, y, 1, asam_eta=eta)
  assert_trees_close(out, want)


@pytest.mark.parametrize("check_vma", [True, False])
def test_plain_shard_map_averages(data, check_vma):
  p, x, y = data
  tx = optax_sam.plain(optax.sgd(LR), axis_name="dev")
  train = shard_map_train(optax_sam.make_update(tx, jax_loss),
                          check_vma=check_vma)
  params = to_jax(p)
  out = train(params, tx.init(params), stack(x), stack(y))
  _, g = reference.loss_and_grad(p, x, y)  # equal shards: mean = full batch
  assert_trees_close(out, reference.tmap(lambda a, b: a - LR * b, p, g))
