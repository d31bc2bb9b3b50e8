"""Shared test helpers: the reference MLP in jax, and conversions."""

import jax
import jax.numpy as jnp
import numpy as np

import reference


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


def deep_mlp(depth, width, batch, scale, seed=0):
  """A deep tanh MLP regression problem: ``(params, loss, x, y)``."""
  keys = jax.random.split(jax.random.PRNGKey(seed), depth + 1)
  params = {f"layer{i}": {"w": jax.random.normal(k, (width, width)) / scale,
                          "b": jnp.zeros(width)}
            for i, k in enumerate(keys[:depth])}

  def loss(q, xb, yb):
    h = xb
    for i in range(depth):
      h = h @ q[f"layer{i}"]["w"] + q[f"layer{i}"]["b"]
      if i < depth - 1:
        h = jnp.tanh(h)
    return jnp.mean(jnp.square(h - yb))

  x = jax.random.normal(keys[-1], (batch, width))
  return params, loss, x, jnp.sin(x)
