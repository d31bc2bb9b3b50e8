"""Independent plain-numpy references for the tests (no jax, no optax).

A two-layer tanh MLP with a mean-squared-error loss and hand-written
backpropagation, and reference SAM/ASAM steps with an SGD-momentum base
optimizer (``optax.sgd(lr, momentum)``: ``t = g + m t``, ``update = -lr t``).
"""

import numpy as np

LAYERS = ("hidden", "out")


def init_params(seed=0, d_in=5, d_hidden=7, d_out=3, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {
      "hidden": {"w": rng.normal(size=(d_in, d_hidden)).astype(dtype) * 0.5,
                 "b": rng.normal(size=(d_hidden,)).astype(dtype) * 0.1},
      "out": {"w": rng.normal(size=(d_hidden, d_out)).astype(dtype) * 0.5,
              "b": rng.normal(size=(d_out,)).astype(dtype) * 0.1},
  }


def make_data(seed=1, n=16, d_in=5, d_out=3):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d_in)).astype(np.float32),
          rng.normal(size=(n, d_out)).astype(np.float32))


def loss_and_grad(p, x, y):
  """MSE loss of the MLP and its gradient, by hand (float64)."""
  w1, b1 = p["hidden"]["w"].astype(np.float64), p["hidden"]["b"]
  w2, b2 = p["out"]["w"].astype(np.float64), p["out"]["b"]
  x = x.astype(np.float64)
  z1 = x @ w1 + b1
  h = np.tanh(z1)
  out = h @ w2 + b2
  r = out - y
  loss = np.mean(r ** 2)
  dout = 2.0 * r / r.size
  dh = dout @ w2.T
  dz1 = dh * (1.0 - h ** 2)
  return loss, {"hidden": {"w": x.T @ dz1, "b": dz1.sum(0)},
                "out": {"w": h.T @ dout, "b": dout.sum(0)}}


def tmap(f, *trees):
  return {k: {n: f(*(t[k][n] for t in trees)) for n in trees[0][k]}
          for k in trees[0]}


def global_norm(tree, layers=LAYERS):
  return np.sqrt(sum(np.sum(np.square(tree[k][n], dtype=np.float64))
                     for k in layers for n in tree[k]))


def sam_eps(g, rho, layers=LAYERS, per_layer=False):
  """rho * g / ||g|| over the perturbed ``layers`` (others 0)."""
  eps = tmap(np.zeros_like, g)
  if per_layer:
    for k in layers:
      nk = global_norm(g, [k])
      for n in g[k]:
        eps[k][n] = rho * g[k][n] / nk
    return eps
  norm = global_norm(g, layers)
  for k in layers:
    for n in g[k]:
      eps[k][n] = rho * g[k][n] / norm
  return eps


def asam_eps(g, w, rho, eta, layers=LAYERS):
  """rho * T^2 g / ||T g|| with T = |w| + eta, over ``layers``."""
  t = tmap(lambda a: np.abs(a.astype(np.float64)) + eta, w)
  tg = tmap(lambda a, b: a * b, t, g)
  norm = global_norm(tg, layers)
  eps = tmap(np.zeros_like, g)
  for k in layers:
    for n in g[k]:
      eps[k][n] = rho * t[k][n] * tg[k][n] / norm
  return eps


def sam_gradient(p, shards, rho, layers=LAYERS, asam_eta=None,
                 sync_ascent=False, per_layer=False):
  """The SAM gradient for data split into ``shards`` [(x, y), ...].

  Each shard perturbs with its own gradient (m-sharpness) unless
  ``sync_ascent``; the descent gradients are averaged over shards.
  """
  def eps_for(g):
    if asam_eta is not None:
      return asam_eps(g, p, rho, asam_eta, layers)
    return sam_eps(g, rho, layers, per_layer)

  clean = [loss_and_grad(p, x, y)[1] for x, y in shards]
  if sync_ascent:
    mean_g = tmap(lambda *a: np.mean(a, axis=0), *clean)
    epss = [eps_for(mean_g)] * len(shards)
  else:
    epss = [eps_for(g) for g in clean]
  descent = [loss_and_grad(tmap(np.add, p, e), x, y)[1]
             for e, (x, y) in zip(epss, shards)]
  return tmap(lambda *a: np.mean(a, axis=0), *descent)


def run_sam_momentum(p, batches, steps, lr, momentum, rho, **kw):
  """Trajectory of SAM with optax.sgd(lr, momentum) as the base optimizer.

  ``batches(step) -> list of shards``. Returns the list of params after each
  step (float64).
  """
  p = tmap(lambda a: a.astype(np.float64), p)
  trace = tmap(np.zeros_like, p)
  out = []
  for s in range(steps):
    g = sam_gradient(p, batches(s), rho, **kw)
    trace = tmap(lambda gg, t: gg + momentum * t, g, trace)
    p = tmap(lambda a, t: a - lr * t, p, trace)
    out.append(p)
  return out
