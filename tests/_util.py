"""Shared test helpers: the reference MLP in jax, conversions, step loops, the
deep MLP problem, compiled FLOPs, and the 8-device harness."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import optax_sam
import reference
from benchmarks import cost as cost_lib


def jax_loss(params, x, y):
  h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
  out = h @ params["out"]["w"] + params["out"]["b"]
  return jnp.mean(jnp.square(out - y))


def to_jax(tree, dtype=jnp.float32):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def to_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def setup(seed=0):
  p = reference.init_params(seed)
  x, y = reference.make_data(seed + 1)
  return p, x, y


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float64), np.asarray(v, np.float64),
      rtol=rtol, atol=atol), a, b)


def make_step(tx, path, jit=True, loss=jax_loss):
  """One step of ``tx`` through C1 (``tx.update(grads, ..., grad_fn=)``) or
  C2 (``make_update``): ``step(params, state, x, y) -> (value, updates,
  state)``; C1's value is ``(None, None)``."""
  import optax_sam  # pylint: disable=g-import-not-at-top
  if path == "c2":
    step = optax_sam.make_update(tx, loss)
  else:
    def step(p, st, xb, yb):
      g = jax.grad(loss)(p, xb, yb)
      u, st = tx.update(g, st, p,
                        grad_fn=lambda q, i: jax.grad(loss)(q, xb, yb))
      return (None, None), u, st
  return jax.jit(step) if jit else step


def rolling_batches(x, y):
  """A different minibatch each step (the rows rotated by ``3 s`` at step
  ``s``), as the references take it: ``s -> [(x_s, y_s)]``, one shard."""
  return lambda s: [(np.roll(x, 3 * s, axis=0), np.roll(y, 3 * s, axis=0))]


def run_steps(tx, params, batches, path, steps, jit=True):
  """Runs ``steps`` steps of ``tx`` via C1 or C2 (:func:`make_step`), step
  ``s`` on the one shard of ``batches(s)``; returns the params and the
  optimizer state after each step."""
  state = tx.init(params)
  step = make_step(tx, path, jit)
  out, states = [], []
  for s in range(steps):
    (xb, yb), = batches(s)
    _, u, state = step(params, state, jnp.asarray(xb), jnp.asarray(yb))
    params = optax.apply_updates(params, u)
    out.append(params)
    states.append(state)
  return out, states


def deep_mlp(depth, width, batch, scale, seed=0):
  """A deep tanh MLP regression problem: ``(params, loss, x, y)``.

  The benchmarks' MLP (:func:`benchmarks.cost.deep_tanh_mlp`, weights
  ``N(0, 1) / scale``) with targets ``sin(x)``.
  """
  params, loss, x = cost_lib.deep_tanh_mlp(depth, width, batch, scale=scale,
                                           seed=seed)
  return params, loss, x, jnp.sin(x)


def flops(fn, *args):
  """FLOPs of ``jax.jit(fn)`` compiled for ``args`` (XLA's cost analysis)."""
  ca = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"]


# ------------------------------------------------- 8 simulated devices

N_DEV = 8


def device_data():
  """The reference MLP and a batch of 4 rows per device: ``(p, x, y)``;
  skips the test without 8 devices (see conftest.py)."""
  if jax.device_count() < N_DEV:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  p = reference.init_params(0)
  x, y = reference.make_data(1, n=4 * N_DEV)
  return p, x, y


def shards(x, y):
  """The per-device shards of a batch: device ``i`` holds rows ``i::N_DEV``."""
  return [(x[i::N_DEV], y[i::N_DEV]) for i in range(N_DEV)]


def stack(x):
  """``(N, ...) -> (N_DEV, N / N_DEV, ...)``, entry ``i`` = rows ``i::N_DEV``
  (the shards of :func:`shards`, stacked)."""
  return jnp.asarray(x).reshape(-1, N_DEV, *x.shape[1:]).swapaxes(0, 1)


def replicate(tree):
  """One copy of ``tree`` per device, stacked (for ``jax.pmap``)."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV,) + a.shape), tree)


def shard_map_train(step, steps=1, check_vma=True):
  """``jit(shard_map(train))`` over ``N_DEV`` devices, where ``train(params,
  state, xs, ys)`` runs ``steps`` calls of ``step(params, state, xb, yb) ->
  (value, updates, state)`` and returns the params; params and state are
  replicated, ``xs``/``ys`` come from :func:`stack`."""
  mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("dev",))

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), P(), P("dev"), P("dev")),
                     out_specs=P(), check_vma=check_vma)
  def train(q, st, xb, yb):
    for _ in range(steps):
      _, u, st = step(q, st, xb[0], yb[0])
      q = optax.apply_updates(q, u)
    return q

  return train


def selective(optimizer, policy, *, restrict_descent=False, **kwargs):
  """The engine with a run-time policy, unselected layers descending along
  the perturbed gradient (or 0 with ``restrict_descent``): the 0.1 API's
  ``selective_sam``."""
  return optax_sam.sharpness_aware(
      optimizer, policy=policy,
      unselected="zero" if restrict_descent else "perturbed", **kwargs)


def reuse(optimizer, schedule, mixer, **kwargs):
  """The engine with a recompute schedule and a mixer (0.1's ``reuse_sam``)."""
  if "perturb" in kwargs:
    kwargs["mask"] = kwargs.pop("perturb")
  return optax_sam.sharpness_aware(optimizer, schedule=schedule, mixer=mixer,
                                   **kwargs)


# ------------------------- one configuration per method, compiled once
# (test_compile_count, test_memory and test_resume run the same steps: in one
# process each (method, path) is traced and compiled once for all three).


def wide_mlp(seed=0):
  """The reference MLP 16 -> 64 -> 8 (``jax_loss``) and 64 rows:
  ``(params, x, y)`` as numpy; large enough that activations and gradients,
  not scalars, make up the compiled step's memory, and as quick to compile
  as the 5 -> 7 -> 3 one."""
  p = reference.init_params(seed, d_in=16, d_hidden=64, d_out=8)
  x, y = reference.make_data(seed + 1, n=64, d_in=16, d_out=8)
  return p, x, y


def committed(tree):
  """``tree`` on the first device, committed (as arrays restored from a
  checkpoint are: jit keys its programs on committedness too)."""
  return jax.device_put(tree, jax.devices()[0])


def sgd_momentum():
  return optax.sgd(0.1, momentum=0.9)


METHODS = {
    "sam": lambda: optax_sam.sam(sgd_momentum(), rho=0.05),
    "asam": lambda: optax_sam.asam(sgd_momentum(), rho=0.5, eta=0.01),
    "layerwise_sam": lambda: optax_sam.layerwise_sam(
        sgd_momentum(), rho=0.05, num_layers=1, every=2),
    "arsam": lambda: optax_sam.arsam(sgd_momentum(), rho=0.05, seed=2),
    "looksam": lambda: optax_sam.looksam(sgd_momentum(), rho=0.05, every=2),
    "slsam": lambda: optax_sam.slsam(sgd_momentum(), rho=0.05, fraction=0.5),
    # A random layer (a typed PRNG key), the ascent every third step.
    "sharpness_aware": lambda: optax_sam.sharpness_aware(
        sgd_momentum(), policy=optax_sam.policies.random_k(1),
        schedule=optax_sam.schedules.recompute_every(3),
        seed=jax.random.key(2)),
    "plain": lambda: optax_sam.plain(sgd_momentum()),
}

_SHARED = {}


def shared_step(name, path, make=None):
  """``(tx, jax.jit(step))`` of ``METHODS[name]`` (or ``make()``) via C1 or
  C2 (:func:`make_step`), built once per process and key."""
  key = (name, path)
  if key not in _SHARED:
    tx = (make or METHODS[name])()
    _SHARED[key] = (tx, make_step(tx, path))
  return _SHARED[key]
