"""Perturbation transforms against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_sam


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"a": {"w": rng.normal(size=(3, 4)).astype(np.float32),
                "b": rng.normal(size=(4,)).astype(np.float32)},
          "c": {"w": rng.normal(size=(4, 2)).astype(np.float32)}}


def _apply(tx, g, params=None):
  out, _ = tx.update(g, tx.init(params if params is not None else g), params)
  return out


def test_sam_perturbation_global():
  g = _tree()
  eps = _apply(optax_sam.sam_perturbation(0.3), g)
  norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2)
                     for v in jax.tree.leaves(g)))
  jax.tree.map(lambda e, x: np.testing.assert_allclose(e, 0.3 * x / norm,
                                                       rtol=1e-6), eps, g)


def test_sam_perturbation_per_layer():
  g = _tree()
  eps = _apply(optax_sam.sam_perturbation(0.3, per_layer=True), g)
  for layer in ("a", "c"):
    n = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2)
                    for v in g[layer].values()))
    for k in g[layer]:
      np.testing.assert_allclose(eps[layer][k], 0.3 * g[layer][k] / n,
                                 rtol=1e-6)


def test_asam_perturbation():
  g, w = _tree(0), _tree(1)
  eps = _apply(optax_sam.asam_perturbation(0.5, 0.01), g, w)
  t = jax.tree.map(lambda x: np.abs(x.astype(np.float64)) + 0.01, w)
  tg = jax.tree.map(lambda a, b: a * b, t, g)
  n = np.sqrt(sum(np.sum(v ** 2) for v in jax.tree.leaves(tg)))
  jax.tree.map(lambda e, a, b: np.testing.assert_allclose(
      e, 0.5 * a * b / n, rtol=1e-5), eps, t, tg)


def test_asam_adaptive_mask_leaves_biases_unscaled():
  g, w = _tree(0), _tree(1)
  mask = {"a": {"w": True, "b": False}, "c": {"w": True}}
  eps = _apply(optax_sam.asam_perturbation(0.5, 0.01, adaptive_mask=mask),
               g, w)
  t = jax.tree.map(lambda x, m: (np.abs(x.astype(np.float64)) + 0.01
                                 if m else np.ones_like(x, np.float64)),
                   w, mask)
  tg = jax.tree.map(lambda a, b: a * b, t, g)
  n = np.sqrt(sum(np.sum(v ** 2) for v in jax.tree.leaves(tg)))
  jax.tree.map(lambda e, a, b: np.testing.assert_allclose(
      e, 0.5 * a * b / n, rtol=1e-5), eps, t, tg)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_normalize_is_safe(scale, dtype):
  if dtype == jnp.float16 and scale > 1e4:
    pytest.skip("not representable in float16")
  g = {"w": jnp.asarray(np.array([3.0, 4.0]) * scale, dtype)}
  out = jax.jit(lambda t: _apply(optax_sam.perturbations.normalize(), t))(g)
  assert out["w"].dtype == dtype
  got = np.asarray(out["w"], np.float32)
  assert np.all(np.isfinite(got))
  nonzero = float(np.asarray(g["w"], np.float32)[0]) != 0.0
  want = [0.6, 0.8] if nonzero else [0.0, 0.0]
  np.testing.assert_allclose(got, want, rtol=1e-2)


def test_safe_norm_matches_numpy():
  g = _tree()
  want = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2)
                     for v in jax.tree.leaves(g)))
  np.testing.assert_allclose(optax_sam.perturbations.safe_norm(g), want,
                             rtol=1e-6)
  assert float(optax_sam.perturbations.safe_norm({"z": jnp.zeros(3)})) == 0.0


def test_rho_schedule_counts_steps():
  tx = optax_sam.perturbations.scale_by_rho(lambda c: 1.0 + c)
  g = {"w": jnp.ones(2)}
  state = tx.init(g)
  for want in (1.0, 2.0, 3.0):
    out, state = tx.update(g, state)
    np.testing.assert_allclose(out["w"], want)


def test_asam_needs_params():
  tx = optax_sam.asam_perturbation()
  with pytest.raises(ValueError, match="needs params"):
    tx.update(_tree(), tx.init(_tree()), None)


def test_safe_norm_of_tiny_constant_under_jit():
  # A compile-time constant lets XLA constant-fold the norm; it must not
  # reassociate it into inf * 0.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from optax_sam._src.perturb import safe_norm  # pylint: disable=g-import-not-at-top
  value = jax.jit(lambda: safe_norm({"a": jnp.full((3,), 1e-30)}))()
  assert float(value) == pytest.approx(3 ** 0.5 * 1e-30, rel=1e-5)


@pytest.mark.parametrize("bad, want", [(np.nan, np.nan), (np.inf, np.inf),
                                       (-np.inf, np.inf)])
@pytest.mark.parametrize("jit", [False, True])
def test_safe_norm_of_a_non_finite_tree_is_not_finite(bad, want, jit):
  g = _tree()
  g["c"]["w"][1, 0] = bad
  safe_norm = optax_sam.perturbations.safe_norm
  norm = (jax.jit(safe_norm) if jit else safe_norm)(g)
  np.testing.assert_equal(float(norm), want)
  # Zero and tiny trees stay finite (exactly 0 for zeros).
  zeros = jax.tree.map(np.zeros_like, g)
  assert float(optax_sam.perturbations.safe_norm(zeros)) == 0.0
  tiny = jax.tree.map(lambda x: np.full_like(x, 1e-30), g)
  assert np.isfinite(float(optax_sam.perturbations.safe_norm(tiny)))
