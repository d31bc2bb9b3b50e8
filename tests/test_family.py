"""The SAM family on the one engine: GSAM, MSAM, SAM-ON, ESAM, m-sharpness,
Friendly-SAM, each against an independent numpy reference (reference.py),
its reduction to SAM or to the base optimizer, and its compiled cost."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
import reference
from _util import (assert_trees_close, deep_mlp, flops, jax_loss, make_step,
                   rolling_batches, run_steps, setup, to_jax)

LR, MOM = 0.1, 0.9
# Eager (no-jit) runs take 1 step (they run the jitted trace op by op; the
# multi-step behaviour is checked under jit).
PATHS = [("c1", True, 4), ("c2", True, 4), ("c2", False, 1)]


def sgd():
  return optax.sgd(LR, momentum=MOM)


def per_example(q, x, y):
  """The reference MLP's per-example squared error, shape [B]."""
  h = jnp.tanh(x @ q["hidden"]["w"] + q["hidden"]["b"])
  out = h @ q["out"]["w"] + q["out"]["b"]
  return jnp.mean(jnp.square(out - y), axis=-1)


def _close(got, want, rtol=2e-5, atol=2e-6):
  for g, w in zip(got, want):
    assert_trees_close(g, w, rtol=rtol, atol=atol)


_SAM = []


def _is_sam(tx):
  """``tx`` runs as ``sam(sgd(), rho=0.05)`` for 3 C2 steps (SAM's run
  computed once for the file)."""
  p, x, y = setup()
  params = to_jax(p)
  if not _SAM:
    _SAM.append(_run(optax_sam.sam(sgd(), rho=0.05), params, x, y, "c2",
                     3)[0])
  got, _ = _run(tx, params, x, y, "c2", 3)
  _close(got, _SAM[0], rtol=1e-6, atol=1e-7)


def _run(tx, params, x, y, path, steps, loss=jax_loss, jit=True):
  state = tx.init(params)
  step = make_step(tx, path, jit, loss)
  out, states = [], []
  for s in range(steps):
    (xb, yb), = rolling_batches(x, y)(s)
    _, u, state = step(params, state, jnp.asarray(xb), jnp.asarray(yb))
    params = optax.apply_updates(params, u)
    out.append(params)
    states.append(state)
  return out, states


# ------------------------------------------------------------------ GSAM

# Warm-up from 0 (below lr_min: the code's line would give a negative
# radius), then linear decay.
LR_SCHED = optax.join_schedules(
    [optax.linear_schedule(0.0, 0.1, 2), optax.linear_schedule(0.1, 0.02, 4)],
    [2])
RHO_MAX, RHO_MIN, LR_MIN = 0.3, 0.1, 0.04


def _rho_np(t):
  lr = float(LR_SCHED(t))
  return max(0.0, RHO_MIN + (RHO_MAX - RHO_MIN) * (lr - LR_MIN) / (
      0.1 - LR_MIN))


@pytest.mark.parametrize("path,jit,steps", PATHS)
def test_gsam_matches_numpy_reference(path, jit, steps):
  p, x, y = setup()
  tx = optax_sam.gsam(sgd(), RHO_MAX, RHO_MIN, alpha=0.4,
                      learning_rate=LR_SCHED, lr_max=0.1, lr_min=LR_MIN)
  got, _ = run_steps(tx, to_jax(p), rolling_batches(x, y), path, steps, jit)
  want = reference.run_gsam_momentum(p, rolling_batches(x, y), steps, LR,
                                     MOM, _rho_np, 0.4)
  assert _rho_np(0) == 0.0  # the warm-up case is exercised
  _close(got, want)


def test_gsam_radius_never_negative():
  rho = optax_sam.perturbations.lr_tied_rho(0.05, 0.01, LR_SCHED, 0.1, 0.04)
  values = np.array([float(rho(t)) for t in range(8)])
  assert np.all(values >= 0) and values[0] == 0.0
  # the line itself, where lr >= lr_min
  np.testing.assert_allclose(values[2], 0.05, rtol=1e-6)
  np.testing.assert_allclose(
      values[5], 0.01 + 0.04 * (float(LR_SCHED(5)) - 0.04) / 0.06, rtol=1e-5)
  const = optax_sam.perturbations.lr_tied_rho(0.05, 0.01, 0.1, 0.1, 0.1)
  assert float(const(3)) == pytest.approx(0.05)  # lr_max == lr_min


def test_gsam_alpha_zero_is_sam():
  _is_sam(optax_sam.gsam(sgd(), 0.05, 0.05, alpha=0.0))


def test_gsam_descent_is_orthogonal_correction():
  g = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}
  ga = {"a": jnp.array([0.0, 1.0]), "b": jnp.array([2.0])}
  d = optax_sam.perturbations.gsam_descent(0.5)(g, ga)
  flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])
  perp = flat(g) - flat(g) @ flat(ga) / (flat(ga) @ flat(ga)) * flat(ga)
  np.testing.assert_allclose(flat(d), flat(ga) - 0.5 * perp, rtol=1e-6)
  assert abs(perp @ flat(ga)) < 1e-6


def test_gsam_needs_lr_max():
  with pytest.raises(ValueError, match="lr_max"):
    optax_sam.gsam(sgd(), learning_rate=LR_SCHED)


# ------------------------------------------------------------------ MSAM


@pytest.mark.parametrize("path,jit,steps", PATHS)
def test_msam_matches_numpy_reference(path, jit, steps):
  p, x, y = setup()
  tx = optax_sam.msam(sgd(), rho=0.3, mu=MOM)
  got, states = run_steps(tx, to_jax(p), rolling_batches(x, y), path, steps,
                          jit)
  want = reference.run_msam_momentum(p, rolling_batches(x, y), steps, LR,
                                     MOM, 0.3)
  _close(got, want)
  # MSAM's own momentum equals the base SGD's trace.
  assert_trees_close(states[-1].perturbation_state.momentum,
                     states[-1].opt_state[0].trace, rtol=1e-6, atol=1e-7)
  assert float(states[-1].clean_active) == 0.0


def test_msam_first_step_is_the_base_optimizer():
  p, x, y = setup()
  params = to_jax(p)
  got, _ = _run(optax_sam.msam(sgd()), params, x, y, "c2", 1)
  base, _ = _run(optax_sam.plain(sgd()), params, x, y, "c2", 1)
  _close(got, base, rtol=1e-6, atol=1e-7)


def test_msam_loss_is_at_the_perturbed_point():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.msam(sgd(), rho=0.3)
  step = jax.jit(optax_sam.make_update(tx, jax_loss))
  state = tx.init(params)
  _, u, state = step(params, state, x, y)
  params = optax.apply_updates(params, u)
  (loss, _), _, _ = step(params, state, x, y)
  m = state.perturbation_state.momentum
  eps = jax.tree.map(lambda a: -0.3 * a / optax.tree.norm(m), m)
  want = jax_loss(jax.tree.map(jnp.add, params, eps), x, y)
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_msam_costs_one_sgd_step():
  params, loss, x, y = deep_mlp(4, 128, 64, scale=12)
  def ratio(tx):
    return flops(optax_sam.make_update(tx, loss), params, tx.init(params),
                 x, y)
  r = ratio(optax_sam.msam(optax.sgd(0.1, momentum=0.9))) / ratio(
      optax_sam.plain(optax.sgd(0.1, momentum=0.9)))
  assert 0.98 < r < 1.05, r


# ----------------------------------------------------------------- F-SAM


@pytest.mark.parametrize("path,jit,steps", PATHS)
def test_fsam_matches_numpy_reference(path, jit, steps):
  p, x, y = setup()
  tx = optax_sam.fsam(sgd(), rho=0.2, sigma=1.0, lmbda=0.6)
  got, _ = run_steps(tx, to_jax(p), rolling_batches(x, y), path, steps, jit)
  want = reference.run_fsam_momentum(p, rolling_batches(x, y), steps, LR,
                                     MOM, 0.2, 1.0, 0.6)
  _close(got, want)


def test_fsam_sigma_zero_is_sam():
  _is_sam(optax_sam.fsam(sgd(), rho=0.05, sigma=0.0))


# ---------------------------------------------------------------- SAM-ON


def ln_mlp(depth=3, width=64, batch=32, seed=0):
  """A deep tanh MLP with a LayerNorm (scale, bias) after each hidden
  layer: ``(params, loss, x, y)``."""
  keys = jax.random.split(jax.random.PRNGKey(seed), depth + 1)
  params = {}
  for i in range(depth):
    params[f"Dense_{i}"] = {
        "kernel": jax.random.normal(keys[i], (width, width)) / width ** 0.5,
        "bias": jnp.zeros(width)}
    params[f"LayerNorm_{i}"] = {"scale": jnp.ones(width),
                                "bias": jnp.zeros(width)}

  def loss(p, xb, yb):
    h = xb
    for i in range(depth):
      h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      mu = h.mean(-1, keepdims=True)
      h = (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True)
                                   + 1e-6)
      h = h * p[f"LayerNorm_{i}"]["scale"] + p[f"LayerNorm_{i}"]["bias"]
      if i < depth - 1:
        h = jnp.tanh(h)
    return jnp.mean(jnp.square(h - yb))

  x = jax.random.normal(keys[-1], (batch, width))
  return params, loss, x, jnp.sin(x)


# C1 with a static mask is the engine's (test_sam); C2 here.
@pytest.mark.parametrize("path,jit,steps", PATHS[1:])
def test_sam_on_matches_numpy_reference(path, jit, steps):
  # The reference MLP has no normalization layer: its output layer plays
  # one (is_norm), so the restriction is checked against sam_gradient.
  p, x, y = setup()
  tx = optax_sam.sam_on(sgd(), rho=0.1, is_norm=lambda path: path[0] == "out")
  got, _ = run_steps(tx, to_jax(p), rolling_batches(x, y), path, steps, jit)
  want = reference.run_sam_momentum(p, rolling_batches(x, y), steps, LR, MOM,
                                    0.1, layers=("out",))
  _close(got, want)


def test_sam_on_default_mask_is_the_norm_affine_parameters():
  params = ln_mlp(depth=2, width=4)[0]
  mask = optax_sam._src.sam_on.norm_mask(params)
  assert mask == {f"Dense_{i}": {"kernel": False, "bias": False}
                  for i in range(2)} | {
                      f"LayerNorm_{i}": {"scale": True, "bias": True}
                      for i in range(2)}
  params = to_jax(setup()[0])  # no normalization layer
  tx = optax_sam.sam_on(sgd())
  with pytest.raises(ValueError, match="no normalization"):
    make_step(tx, "c2", jit=False)(params, tx.init(params), *setup()[1:])


def test_sam_on_ascent_skips_weight_gradients():
  params, loss, x, y = ln_mlp()
  def cost(tx):
    return flops(optax_sam.make_update(tx, loss), params, tx.init(params),
                 x, y)
  # SAM: two full gradients. SAM-ON's clean pass differentiates the
  # LayerNorm leaves only: no kernel-gradient products (a third of a
  # gradient's matmul FLOPs), so about 5/3 gradients.
  ratio = cost(optax_sam.sam_on(optax.sgd(0.1))) / cost(
      optax_sam.sam(optax.sgd(0.1)))
  assert ratio < 0.9, ratio


# ------------------------------------------------------------------ ESAM


def _leaf_names(params):
  groups = optax_sam.layer_groups(params, labels=optax_sam._src.slsam
                                  .per_leaf_label)
  return [tuple(n.split("/")) for n in groups.names]


# Eager: data selection only (beta=1), the draw is checked under jit.
@pytest.mark.parametrize("path,jit,steps,beta", [("c2", True, 5, 0.5),
                                                 ("c2", False, 1, 1.0)])
def test_esam_matches_numpy_reference(path, jit, steps, beta):
  p, x, y = setup()
  tx = optax_sam.esam(sgd(), rho=0.1, beta=beta, gamma=0.5, seed=3)
  got, states = _run(tx, to_jax(p), x, y, path, steps, per_example, jit)
  names = _leaf_names(p)
  sels = [{names[i] for i, f in enumerate(np.asarray(s.last_selection)) if f}
          if beta < 1 else set(names) for s in states]
  assert len(sels[0]) == 4  # the first step perturbs every tensor
  assert steps == 1 or any(len(s) < 4 for s in sels)  # later: subsets
  want = reference.run_esam_momentum(p, rolling_batches(x, y), sels, LR, MOM,
                                     0.1, beta, 0.5)
  _close(got, want)


def test_esam_swp_only_in_c1_matches_reference():
  p, x, y = setup()
  tx = optax_sam.esam(sgd(), rho=0.1, beta=0.5, gamma=1.0, seed=1)
  got, states = run_steps(tx, to_jax(p), rolling_batches(x, y), "c1", 4)
  names = _leaf_names(p)
  sels = [{names[i] for i, f in enumerate(np.asarray(s.last_selection)) if f}
          for s in states]
  want = reference.run_esam_momentum(p, rolling_batches(x, y), sels, LR, MOM,
                                     0.1, 0.5, 1.0)
  _close(got, want)


def test_esam_beta_gamma_one_is_sam():
  _is_sam(optax_sam.esam(sgd(), rho=0.05, beta=1.0, gamma=1.0))


def test_esam_data_selection_needs_per_example_losses_and_c2():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.esam(sgd())
  with pytest.raises(ValueError, match="per-example losses"):
    optax_sam.make_update(tx, jax_loss)(params, tx.init(params), x, y)
  with pytest.raises(ValueError, match="loss-driven"):
    make_step(tx, "c1", jit=False)(params, tx.init(params), x, y)
  # per_example_loss turns the mean loss into per-example losses.
  np.testing.assert_allclose(optax_sam.per_example_loss(jax_loss)(
      params, x, y), per_example(params, x, y), rtol=1e-6)


# ------------------------------------------------------------ m-sharpness


def _micro(x, y, m):
  return lambda s: [(xs, ys) for xs, ys in zip(
      np.split(np.roll(x, 3 * s, axis=0), len(x) // m),
      np.split(np.roll(y, 3 * s, axis=0), len(y) // m))]


@pytest.mark.parametrize("m,jit,steps,loop", [
    (1, True, 3, "vmap"), (4, True, 3, "vmap"), (1, True, 3, "map"),
    (4, False, 1, "map")])
def test_m_sharpness_matches_numpy_reference(m, jit, steps, loop):
  p, x, y = setup()
  tx = optax_sam.sam(sgd(), rho=0.1, m=m, micro_batch_loop=loop)
  got, _ = _run(tx, to_jax(p), x, y, "c2", steps, jit=jit)
  want = reference.run_sam_momentum(p, _micro(x, y, m), steps, LR, MOM, 0.1)
  _close(got, want)


def test_m_equal_to_the_batch_is_sam():
  _is_sam(optax_sam.sam(sgd(), rho=0.05, m=16))


def test_m_sharpness_errors():
  p, x, y = setup()
  params = to_jax(p)
  tx = optax_sam.sam(sgd(), m=4)
  with pytest.raises(ValueError, match="loss-driven"):
    make_step(tx, "c1", jit=False)(params, tx.init(params), x, y)
  with pytest.raises(ValueError, match="multiple of m=5"):
    step = optax_sam.make_update(optax_sam.sam(sgd(), m=5), jax_loss)
    step(params, tx.init(params), x, y)
  with pytest.raises(ValueError, match="policy or a schedule"):
    optax_sam.sam(sgd(), m=2, schedule=optax_sam.schedules.recompute_every(2))


def test_esam_per_example_from_mean_equals_given_losses():
  p, x, y = setup()
  params = to_jax(p)
  given, _ = _run(optax_sam.esam(sgd(), beta=1.0), params, x, y, "c2", 2,
                  per_example)
  derived, _ = _run(optax_sam.esam(sgd(), beta=1.0,
                                   per_example_from_mean=True),
                    params, x, y, "c2", 2, jax_loss)
  _close(given, derived, rtol=1e-6, atol=1e-7)


def test_family_is_registered_in_the_benchmarks():
  from benchmarks import methods as methods_lib  # pylint: disable=g-import-not-at-top
  params = to_jax(setup()[0])
  for name in ("gsam", "msam", "sam_on", "esam", "fsam", "sam_m"):
    assert name in methods_lib.names()
    tx = methods_lib.build(name, optax.sgd(0.1)).tx
    assert isinstance(tx.init(params), optax_sam.SharpnessAwareState)


# F-SAM's average is the state a device could make its own (MSAM's momentum
# is of the averaged descent gradient, replicated by construction).
@pytest.mark.parametrize("name", ["fsam"])
def test_stateful_perturbations_stay_replicated_under_shard_map(name):
  # shard_map with out_specs=P() and check_vma refuses a state that varies
  # over devices: the average / momentum must be the same on every device
  # (each device ascends with its own shard's gradient).
  import functools  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from _util import N_DEV, stack  # pylint: disable=g-import-not-at-top
  if jax.device_count() < N_DEV:
    pytest.skip("needs 8 devices (conftest.py)")
  p, _, _ = setup()
  x, y = reference.make_data(1, n=4 * N_DEV)
  make = {"fsam": optax_sam.fsam, "msam": optax_sam.msam}[name]
  tx = make(optax.sgd(LR, momentum=MOM), axis_name="dev")
  step = optax_sam.make_update(tx, jax_loss)
  mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("dev",))

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), P(), P("dev"), P("dev")),
                     out_specs=(P(), P()))
  def train(q, st, xb, yb):
    for _ in range(2):
      _, u, st = step(q, st, xb[0], yb[0])
      q = optax.apply_updates(q, u)
    return q, st

  params = to_jax(p)
  out, state = train(params, tx.init(params), stack(x), stack(y))
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(
      (out, state.perturbation_state)))
