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
