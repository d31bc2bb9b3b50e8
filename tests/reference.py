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


# --- Layer selection (selective_sam, layerwise_sam). ---


def top_k_layers(g, k, layers=LAYERS):
  """The ``k`` layers with the largest gradient norm, in depth order (ties:
  the deeper layer wins)."""
  norms = [global_norm(g, [n]) for n in layers]
  order = sorted(range(len(layers)), key=lambda i: (norms[i], i))
  return tuple(layers[i] for i in sorted(order[len(layers) - k:]))


def run_top_k_momentum(p, x, y, steps, lr, momentum, rho, k, interval=1,
                       alpha=1.0, restrict_descent=False,
                       unselected=None):
  """Trajectory of top-k layer-selective SAM with optax.sgd(lr, momentum):
  :func:`run_composed_momentum` recomputing every step. Returns (params
  after each step, the selection each step used)."""
  if unselected is None:
    unselected = "zero" if restrict_descent else "perturbed"
  out, sels, _ = run_composed_momentum(
      p, x, y, steps, lr, momentum, rho, k=k, interval=interval, alpha=alpha,
      unselected=unselected)
  return out, sels


def run_composed_momentum(p, x, y, steps, lr, momentum, rho, *, k=None,
                          interval=1, alpha=1.0, unselected="perturbed",
                          decide=None, store=None, mix=None):
  """Trajectory of the engine's compositions with optax.sgd(lr, momentum).

  Layer selection: the last ``k`` layers at first (every layer when ``k``
  is None); after every ``interval`` steps the :func:`top_k_layers` of the
  clean gradient (``unselected="clean"``) or of the descent gradient
  (otherwise). A recompute step (``decide(t)``, always when None; the first
  step always) perturbs the selected layers by SAM's ``eps``; the selected
  layers descend along ``(1 - alpha) g + alpha g_adv``, the others along
  ``g`` ("clean"), ``g_adv`` ("perturbed") or 0 ("zero"); ``store(g,
  descent)`` is kept. A reuse step descends along ``mix(g, stored, age)``
  (0 outside the selection with "zero"). Returns (params after each step,
  selections, decisions).
  """
  p = tmap(lambda a: a.astype(np.float64), p)
  trace = tmap(np.zeros_like, p)
  selected = LAYERS if k is None else LAYERS[len(LAYERS) - k:]
  stored, age, n_rec = None, 0, 0
  out, sels, decisions = [], [], []
  for t in range(steps):
    sels.append(tuple(selected))
    _, g = loss_and_grad(p, x, y)
    rec = decide is None or bool(decide(t)) or n_rec == 0
    decisions.append(rec)
    if rec:
      eps = sam_eps(g, rho, layers=selected)
      _, g_adv = loss_and_grad(tmap(np.add, p, eps), x, y)
      other = {"clean": g, "perturbed": g_adv,
               "zero": tmap(np.zeros_like, g)}[unselected]
      descent = {n: {m: ((1 - alpha) * g[n][m] + alpha * g_adv[n][m]
                         if n in selected else other[n][m]) for m in g[n]}
                 for n in g}
      if store is not None:
        stored, age = store(g, descent), 0
      n_rec += 1
    else:
      age += 1
      descent = mix(g, stored, age)
      if unselected == "zero":
        descent = {n: {m: (v if n in selected else np.zeros_like(v))
                       for m, v in descent[n].items()} for n in descent}
    if k is not None and (t + 1) % interval == 0:
      selected = top_k_layers(g if unselected == "clean" else descent, k)
    trace = tmap(lambda gg, tr: gg + momentum * tr, descent, trace)
    p = tmap(lambda a, tr: a - lr * tr, p, trace)
    out.append(p)
  return out, sels, decisions


# --- Reuse methods (LookSAM, ARSAM): added for test_looksam / test_arsam. ---


def tmean(trees):
  """Elementwise mean of a list of trees."""
  return tmap(lambda *a: np.mean(a, axis=0), *trees)


def tdot(a, b):
  return sum(float(np.sum(a[k][n].astype(np.float64) * b[k][n]))
             for k in a for n in a[k])


def looksam_store(g, gs, groups=None):
  """g_v: the part of ``gs`` orthogonal to ``g`` (per group of layer names
  when ``groups`` is given, e.g. [("hidden",), ("out",)])."""
  groups = groups or [tuple(g)]
  gv = tmap(lambda a: a.astype(np.float64), gs)
  for layers in groups:
    ng = global_norm(g, layers)
    u = {k: {n: (g[k][n] / ng if ng > 0 else 0.0 * g[k][n])
             for n in g[k]} for k in layers}
    d = sum(float(np.sum(gs[k][n] * u[k][n])) for k in layers for n in g[k])
    for k in layers:
      for n in g[k]:
        gv[k][n] = gs[k][n] - d * u[k][n]
  return gv


def looksam_mix(g, gv, alpha, groups=None):
  """g + alpha * ||g|| / ||g_v|| * g_v (per group when ``groups`` given)."""
  groups = groups or [tuple(g)]
  out = tmap(lambda a: a.astype(np.float64), g)
  for layers in groups:
    ng, nv = global_norm(g, layers), global_norm(gv, layers)
    scale = alpha * ng / nv if nv > 0 else 0.0
    for k in layers:
      for n in g[k]:
        out[k][n] = g[k][n] + scale * gv[k][n]
  return out


def psf_store(g, gs):
  return tmap(lambda a, b: b - a, g, gs)


def psf_mix(g, psf, age, decay, horizon):
  c = decay ** age if (horizon is None or age <= horizon) else 0.0
  return tmap(lambda a, s: a + c * s, g, psf)


class AdaptiveScheduleRef:
  """ARSAM's adaptive sampling (the vSAM-code rule), in plain Python.

  ``uniforms[t]`` is the uniform number drawn for step ``t`` (from the same
  key as the implementation); everything else is recomputed here.
  """

  def __init__(self, uniforms, window, blocks, max_fraction, gains,
               init_rate, warmup):
    self.u = uniforms
    self.window, self.blocks, self.warmup = window, blocks, warmup
    self.max_rate = int(window * max_fraction)
    self.gains = gains
    self.rate = float(init_rate)
    self.done = 0
    self.t = 0
    self.norms = [0.0] * window          # padded with zeros, oldest first
    self.ratios, self.variances = [], []  # observed values only
    self.rates = []

  def decide(self):
    t, w = self.t, self.window
    if t < self.warmup:
      return True
    pos = (t - self.warmup) % w
    quota = int(np.floor(self.rate))
    if self.done < quota and self.u[t] < self.rate / w:
      return True
    return w - pos <= quota - self.done

  def _block_var(self):
    width = self.window // self.blocks
    s = np.sort(np.asarray(self.norms))[:self.blocks * width]
    return float(np.mean(np.var(s.reshape(self.blocks, width), axis=1,
                                ddof=1)))

  @staticmethod
  def _trend(hist):
    rel = [(b - a) / a for a, b in zip(hist[:-1], hist[1:]) if a > 0]
    return float(np.clip(np.mean(rel), -1, 1)) if rel else 0.0

  def observe(self, recomputed, psf_norm, g_norm):
    if recomputed:
      self.norms = self.norms[1:] + [psf_norm]
      self.ratios = (self.ratios + [psf_norm / g_norm if g_norm > 0
                                    else 0.0])[-self.window:]
      self.variances = (self.variances + [self._block_var()])[-self.window:]
      self.done += 1
    self.t += 1
    if self.t >= self.warmup and (self.t - self.warmup) % self.window == 0:
      r1, r2 = self._trend(self.ratios), self._trend(self.variances)
      self.rate = float(np.clip(
          self.rate * (1 + self.gains[0] * r1 + self.gains[1] * r2), 1,
          self.max_rate))
      self.done = 0
    self.rates.append(self.rate)


def run_reuse_momentum(p, batches, steps, lr, momentum, rho, decide, store,
                       mix, observe=None, sync_ascent=False):
  """Trajectory of a reuse method with optax.sgd(lr, momentum) as the base.

  ``decide(t) -> bool`` (the first step always recomputes), ``store(g, gs)``,
  ``mix(g, stored, age)``, ``observe(recomputed, ||gs - g||, ||g||)``; ``g``
  and ``gs`` are means over the shards of ``batches(t)``, each shard
  perturbing along its own gradient unless ``sync_ascent``. Returns (params
  after each step, decisions).
  """
  p = tmap(lambda a: a.astype(np.float64), p)
  trace = tmap(np.zeros_like, p)
  stored, age, n_rec = None, 0, 0
  out, decisions = [], []
  for t in range(steps):
    shards = batches(t)
    g = tmean([loss_and_grad(p, x, y)[1] for x, y in shards])
    rec = bool(decide(t)) or n_rec == 0
    decisions.append(rec)
    if rec:
      gs = sam_gradient(p, shards, rho, sync_ascent=sync_ascent)
      stored, age, n_rec = store(g, gs), 0, n_rec + 1
      descent = gs
      if observe is not None:
        observe(True, global_norm(tmap(np.subtract, gs, g)), global_norm(g))
    else:
      age += 1
      descent = mix(g, stored, age)
      if observe is not None:
        observe(False, 0.0, 0.0)
    trace = tmap(lambda gg, tr: gg + momentum * tr, descent, trace)
    p = tmap(lambda a, tr: a - lr * tr, p, trace)
    out.append(p)
  return out, decisions


# --- SL-SAM: a line-by-line numpy port of the authors' SLSAM.get_prob. ---


def slsam_get_prob(prob, s, alpha_p, abs_grad_array, idx_array):
  """``SLSAM.get_prob`` (github.com/chengyif/SL-SAM), ported line by line
  to numpy float64: the new probabilities from the old ones ``prob``, the
  budget ``s``, the bandit rate ``alpha_p``, and the gradient norms
  ``abs_grad_array`` of the tensors ``idx_array`` drawn this step."""
  prob = np.array(prob, np.float64)
  abs_grad_array = np.asarray(abs_grad_array, np.float64)
  big_l = max(abs_grad_array)
  p_min = 0.001
  w = prob  # an alias, as in the code: prob is updated in place
  budget = s * len(w)
  prob_array = prob[idx_array]
  l_hat_raw = -(abs_grad_array / prob_array) ** 2 + (big_l / p_min) ** 2
  l_hat = l_hat_raw - np.min(l_hat_raw)
  w[idx_array] = prob_array * np.exp(-alpha_p * l_hat / prob_array)
  sort_indx = np.argsort(-w)
  w_sort = -np.sort(-w)
  j = 0
  while j < len(w):
    i = sort_indx[j]
    temp_sum = max(sum(w_sort[j:]), 1e-5)
    if w[i] * budget <= temp_sum:
      for k in range(j, len(w)):
        i = sort_indx[k]
        prob[i] = w[i] * budget / float(temp_sum)
      j = len(w) + 1
    else:
      prob[i] = 1
      budget -= 1
    j += 1
  return np.clip(prob, a_min=1e-8, a_max=1.0)


def run_slsam_momentum(p, x, y, selections, lr, momentum, rho):
  """SL-SAM with optax.sgd(lr, momentum) given each step's drawn leaves
  (``selections[t]``: a set of (layer, name) pairs): the clean gradient
  of the drawn leaves, ``eps = rho g_S / ||g_S||`` on them, the gradient at
  ``w + eps`` as their descent; leaves not drawn keep their parameters and
  their momentum (PyTorch skips a tensor without a gradient)."""
  p = tmap(lambda a: a.astype(np.float64), p)
  trace = tmap(np.zeros_like, p)
  out = []
  for sel in selections:
    _, g = loss_and_grad(p, x, y)
    norm = np.sqrt(sum(float(np.sum(g[k][n] ** 2)) for k, n in sel))
    scale = rho / norm if norm > 0 else 0.0
    w_adv = {k: {n: (p[k][n] + scale * g[k][n] if (k, n) in sel
                     else p[k][n]) for n in p[k]} for k in p}
    _, g_adv = loss_and_grad(w_adv, x, y)
    for k in p:
      for n in p[k]:
        if (k, n) in sel:
          trace[k][n] = g_adv[k][n] + momentum * trace[k][n]
          p[k][n] = p[k][n] - lr * trace[k][n]
    out.append(tmap(np.copy, p))
  return out


# --- The SAM family (test_family): GSAM, MSAM, F-SAM, ESAM, m-sharpness. ---


def _sgd_momentum_step(p, trace, descent, lr, momentum):
  trace = tmap(lambda gg, t: gg + momentum * t, descent, trace)
  return tmap(lambda a, t: a - lr * t, p, trace), trace


def run_gsam_momentum(p, batches, steps, lr, momentum, rho_at, alpha):
  """GSAM (minimize_fp, global vectors) with optax.sgd(lr, momentum):
  ``eps = rho_t g / ||g||``, ``u = g_adv / ||g_adv||``, descent
  ``g_adv - alpha (g - <g, u> u)``; ``rho_at(t)`` the radius of step t."""
  p = tmap(lambda a: a.astype(np.float64), p)
  trace = tmap(np.zeros_like, p)
  out = []
  for t in range(steps):
    (x, y), = batches(t)
    _, g = loss_and_grad(p, x, y)
    eps = sam_eps(g, rho_at(t))
    _, ga = loss_and_grad(tmap(np.add, p, eps), x, y)
    u = tmap(lambda a: a / global_norm(ga), ga)
    dot = tdot(g, u)
    descent = tmap(lambda a, gg, uu: a - alpha * (gg - dot * uu), ga, g, u)
    p, trace = _sgd_momentum_step(p, trace, descent, lr, momentum)
    out.append(p)
  return out


def run_msam_momentum(p, batches, steps, lr, momentum, rho):
  """MSAM with optax.sgd(lr, momentum): the one gradient at
  ``w - rho m / ||m||`` (``w`` when ``m = 0``), ``m = momentum m + g``."""
  p = tmap(lambda a: a.astype(np.float64), p)
  trace = tmap(np.zeros_like, p)
  m = tmap(np.zeros_like, p)
  out = []
  for t in range(steps):
    (x, y), = batches(t)
    norm = global_norm(m)
    eps = tmap(lambda a: -rho * a / norm if norm > 0 else 0 * a, m)
    _, g = loss_and_grad(tmap(np.add, p, eps), x, y)
    m = tmap(lambda a, gg: momentum * a + gg, m, g)
    p, trace = _sgd_momentum_step(p, trace, g, lr, momentum)
    out.append(p)
  return out


def run_fsam_momentum(p, batches, steps, lr, momentum, rho, sigma, lmbda):
  """F-SAM as the authors' FriendlySAM.first_step, optax.sgd base:
  ``d = g - sigma m`` (``d = g``, ``m = g`` at the first step), then
  ``m = lmbda m + (1 - lmbda) g``; ``eps = rho d / ||d||``."""
  p = tmap(lambda a: a.astype(np.float64), p)
  trace = tmap(np.zeros_like, p)
  m = None
  out = []
  for t in range(steps):
    (x, y), = batches(t)
    _, g = loss_and_grad(p, x, y)
    if m is None:
      d, m = g, g
    else:
      d = tmap(lambda a, b: a - sigma * b, g, m)
      m = tmap(lambda b, a: lmbda * b + (1 - lmbda) * a, m, g)
    eps = sam_eps(d, rho)
    _, ga = loss_and_grad(tmap(np.add, p, eps), x, y)
    p, trace = _sgd_momentum_step(p, trace, ga, lr, momentum)
    out.append(p)
  return out


def per_example_losses(p, x, y):
  """The MLP's squared error per example (mean over outputs), float64."""
  h = np.tanh(x.astype(np.float64) @ p["hidden"]["w"] + p["hidden"]["b"])
  out = h @ p["out"]["w"] + p["out"]["b"]
  return np.mean((out - y) ** 2, axis=1)


def run_esam_momentum(p, batches, selections, lr, momentum, rho, beta, gamma):
  """ESAM with optax.sgd(lr, momentum), given each step's drawn leaves
  (``selections[t]``, a set of (layer, name)): ``eps = (rho / beta) g_S /
  ||g_S||`` on them; the descent is the gradient at ``w + eps`` of the mean
  loss over the ``floor(gamma B)`` examples whose loss rose most."""
  p = tmap(lambda a: a.astype(np.float64), p)
  trace = tmap(np.zeros_like, p)
  out = []
  for t, sel in enumerate(selections):
    (x, y), = batches(t)
    _, g = loss_and_grad(p, x, y)
    norm = np.sqrt(sum(float(np.sum(g[k][n] ** 2)) for k, n in sel))
    w_adv = {k: {n: (p[k][n] + rho / beta * g[k][n] / norm if (k, n) in sel
                     else p[k][n]) for n in p[k]} for k in p}
    rise = per_example_losses(w_adv, x, y) - per_example_losses(p, x, y)
    keep = np.argsort(-rise, kind="stable")[:max(1, int(gamma * len(x)))]
    _, ga = loss_and_grad(w_adv, x[keep], y[keep])
    p, trace = _sgd_momentum_step(p, trace, ga, lr, momentum)
    out.append(p)
  return out
