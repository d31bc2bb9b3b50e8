"""Data parallelism on 8 simulated CPU devices (see conftest.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import optax_sam
import reference
from _util import assert_trees_close, jax_loss, to_jax

N_DEV = 8
LR = 0.1


@pytest.fixture(scope="module")
def data():
  if jax.device_count() < N_DEV:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  p = reference.init_params(0)
  x, y = reference.make_data(1, n=4 * N_DEV)
  return p, x, y


def _shards(x, y):
  return [(x[i::N_DEV], y[i::N_DEV]) for i in range(N_DEV)]


def _stack(x):  # (N, ...) -> (N_DEV, N/N_DEV, ...), shard i = rows i::N_DEV
  return jnp.asarray(x).reshape(-1, N_DEV, *x.shape[1:]).swapaxes(0, 1)


def _replicate(tree):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV,) + a.shape), tree)


def _reference(p, x, y, steps, **kw):
  q = p
  for _ in range(steps):
    g = reference.sam_gradient(q, _shards(x, y), 0.05, **kw)
    q = reference.tmap(lambda a, b: a - LR * b, q, g)
  return q


@pytest.mark.parametrize("sync_ascent", [False, True])
@pytest.mark.parametrize("path", ["c1", "c2"])
def test_pmap_m_sharpness(data, sync_ascent, path):
  p, x, y = data
  tx = optax_sam.sam(optax.sgd(LR), rho=0.05, axis_name="dev",
                     sync_ascent=sync_ascent)
  if path == "c2":
    step = optax_sam.make_update(tx, jax_loss)
  else:
    def step(q, st, xb, yb):
      g = jax.grad(jax_loss)(q, xb, yb)
      u, st = tx.update(g, st, q,
                        grad_fn=lambda r, i: jax.grad(jax_loss)(r, xb, yb))
      return None, u, st

  @functools.partial(jax.pmap, axis_name="dev")
  def train(q, st, xb, yb):
    for _ in range(2):
      _, u, st = step(q, st, xb, yb)
      q = optax.apply_updates(q, u)
    return q

  params = to_jax(p)
  rep = _replicate(params)
  st = _replicate(tx.init(params))
  out = train(rep, st, _stack(x), _stack(y))
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
  mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("dev",))
  kw = {"rho": 0.05} if factory is optax_sam.sam else {"rho": 0.05,
                                                        "eta": 0.01}
  tx = factory(optax.sgd(LR), axis_name="dev", **kw)
  step = optax_sam.make_update(tx, jax_loss)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), P(), P("dev"), P("dev")),
                     out_specs=P(), check_vma=check_vma)
  def train(q, st, xb, yb):
    _, u, st = step(q, st, xb[0], yb[0])
    return optax.apply_updates(q, u)

  params = to_jax(p)
  out = train(params, tx.init(params), _stack(x), _stack(y))
  eta = 0.01 if factory is optax_sam.asam else None
  want = _reference(p, x, y, 1, asam_eta=eta)
  assert_trees_close(out, want)


@pytest.mark.parametrize("check_vma", [True, False])
def test_plain_shard_map_averages(data, check_vma):
  p, x, y = data
  mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("dev",))
  tx = optax_sam.plain(optax.sgd(LR), axis_name="dev")
  step = optax_sam.make_update(tx, jax_loss)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), P(), P("dev"), P("dev")),
                     out_specs=P(), check_vma=check_vma)
  def train(q, st, xb, yb):
    _, u, st = step(q, st, xb[0], yb[0])
    return optax.apply_updates(q, u)

  params = to_jax(p)
  out = train(params, tx.init(params), _stack(x), _stack(y))
  _, g = reference.loss_and_grad(p, x, y)  # equal shards: mean = full batch
  assert_trees_close(out, reference.tmap(lambda a, b: a - LR * b, p, g))
