"""Checkpoint and resume, bit-for-bit, for every method (orbax on disk).

Each case runs ``N`` steps uninterrupted (a different minibatch each step)
and saves params and optimizer state to disk with orbax after step ``K``.
The checkpoint is restored into a structure built afresh (``jax.eval_shape``
of a newly built ``tx.init``, shapes and dtypes only: no value comes from
the in-memory run), training continues from it, and the params and every
state leaf after step ``N`` must equal the uninterrupted run's exactly.
Continuing from a freshly initialised state instead must not (so the
comparison sees the state).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_sam
from _util import (METHODS, committed, jax_loss, rolling_batches,
                   sgd_momentum, shared_step, to_jax, wide_mlp)

N, K = 6, 3
# What each method decides at run time over the N steps, so that the resumed
# steps really depend on the restored decisions (and keys).
VARIES = {"slsam": ("last_selection",),
          "sharpness_aware": ("last_selection", "recomputed"),
          "looksam": ("recomputed",)}
# C2 for every method; C1 (the same state, other gradient passes) for two.
PATHS = [(name, "c2") for name in METHODS] + [("sam", "c1"),
                                               ("sharpness_aware", "c1")]


def _save(path, tree):
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, tree)


def _restore(path, like):
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path, like)


def _np(x):
  """A host copy; a typed PRNG key as ``(key data, its dtype)``."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x)), str(x.dtype)
  return np.asarray(x), str(x.dtype)


def _host(tree):
  """Host copies of the leaves (typed keys stay as they are)."""
  return jax.tree.map(lambda x: x if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.asarray(x), tree)


def _assert_equal(a, b, what):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f"{what}: {ta} != {tb}"
  paths = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_flatten_with_path(a)[0]]
  for path, u, v in zip(paths, la, lb):
    (u, du), (v, dv) = _np(u), _np(v)
    assert du == dv and u.shape == v.shape, (what, path, du, dv)
    np.testing.assert_array_equal(u, v, err_msg=f"{what} {path}")


def _differs(a, b):
  return any(not np.array_equal(_np(u)[0], _np(v)[0])
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _resume(make, tx, run_step, tmp_path, fresh_step=None, from_fresh=True):
  """Runs ``tx`` with ``run_step``; returns the uninterrupted and the
  resumed ``(params, state)`` after step N, the run continued from a fresh
  state, and the states of the uninterrupted run."""
  p, x, y = wide_mlp(0)
  batches = rolling_batches(x, y)
  # Committed to one device, as restored arrays are: one compiled program
  # serves the whole test (jit keys its cache on committedness too).
  params0 = committed(to_jax(p))
  params, state = params0, committed(tx.init(params0))
  trace = []
  path = tmp_path / "ckpt"
  for s in range(N):
    if s == K:
      _save(path, {"params": params, "state": state})
      saved = _host((params, state))
    (xb, yb), = batches(s)
    xb, yb = committed((jnp.asarray(xb), jnp.asarray(yb)))
    _, u, state = run_step(params, state, xb, yb)
    params = optax.apply_updates(params, u)
    trace.append(state)
  want = _host((params, state))

  # A restart: the method built again, the target's shapes from its init.
  tx2 = make()
  like = jax.eval_shape(lambda: {"params": params0,
                                 "state": tx2.init(params0)})
  restored = _restore(path, like)
  _assert_equal((restored["params"], restored["state"]), saved, "restored")
  step2 = fresh_step(tx2) if fresh_step is not None else run_step

  def cont(params, state):
    for s in range(K, N):
      (xb, yb), = batches(s)
      xb, yb = committed((jnp.asarray(xb), jnp.asarray(yb)))
      _, u, state = step2(params, state, xb, yb)
      params = optax.apply_updates(params, u)
    return _host((params, state))

  got = cont(restored["params"], restored["state"])
  if from_fresh:
    from_fresh = cont(restored["params"], committed(tx2.init(params0)))
  return want, got, from_fresh, trace


def _check(name, want, got, from_fresh, trace):
  _assert_equal(got[0], want[0], f"{name} params")
  _assert_equal(got[1], want[1], f"{name} state")
  assert from_fresh is False or _differs(from_fresh[0], want[0]), (
      f"{name}: a fresh state resumes identically; the test cannot see the "
      "state")
  for field in VARIES.get(name, ()):
    seen = {tuple(np.ravel(np.asarray(getattr(s, field))).tolist())
            for s in trace[K:]}
    assert len(seen) >= 2, (name, field, seen)


@pytest.mark.parametrize("name,path", PATHS)
def test_resume_bit_for_bit(name, path, tmp_path):
  tx, run_step = shared_step(name, path)
  want, got, from_fresh, trace = _resume(METHODS[name], tx, run_step,
                                         tmp_path)
  _check(name, want, got, from_fresh, trace)


def test_resume_specialized_step(tmp_path):
  """``SpecializedStep``: a fresh helper (empty program cache, as after a
  restart) continues from the restored state and runs the same programs'
  decisions."""
  def make():
    return optax_sam.layerwise_sam(sgd_momentum(), rho=0.05, num_layers=1,
                                   every=2, executor="specialize")

  tx = make()
  first = optax_sam.SpecializedStep(tx, jax_loss)
  fresh = []

  def fresh_step(tx):
    fresh.append(optax_sam.SpecializedStep(tx, jax_loss))
    return fresh[-1]

  # (No run from a fresh state: its decision would cost one more program;
  # the other cases show that the comparison sees the state.)
  want, got, from_fresh, trace = _resume(make, tx, first, tmp_path,
                                         fresh_step, from_fresh=False)
  _check("layerwise_sam", want, got, from_fresh, trace)
  # The resumed helper compiled one program, for the decision the
  # uninterrupted run took at that point (read from the restored state).
  assert fresh[0].compilations == 1
  assert fresh[0].selections[0] == tuple(
      np.asarray(trace[K - 1].policy.selection).tolist())
  assert len(first.selections) == 2  # the selection changed in the run
