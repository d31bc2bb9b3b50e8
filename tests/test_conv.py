"""The forward-form convolution: values and gradients against XLA's rule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import optax_sam
from _util import assert_trees_close

NHWC = ("NHWC", "HWIO", "NHWC")

# name -> (input shape, kernel shape, keyword arguments)
COVERED = {
    "same": ((2, 9, 9, 3), (3, 3, 3, 4), dict(window_strides=(1, 1),
                                              padding="SAME")),
    "same_stride2": ((2, 9, 9, 3), (3, 3, 3, 4),
                     dict(window_strides=(2, 2), padding="SAME")),
    "valid_strides_2_3": ((2, 10, 9, 3), (3, 3, 3, 4),
                          dict(window_strides=(2, 3), padding="VALID")),
    "1x1_stride2": ((2, 10, 9, 3), (1, 1, 3, 4),
                    dict(window_strides=(2, 2), padding="VALID")),
    "explicit_pad_dilation": ((2, 10, 9, 3), (3, 2, 3, 4),
                              dict(window_strides=(2, 1),
                                   padding=((1, 0), (1, 1)),
                                   rhs_dilation=(2, 1))),
    "groups": ((2, 10, 9, 4), (3, 3, 2, 6),
               dict(window_strides=(1, 2), padding="SAME",
                    feature_group_count=2)),
    "depthwise": ((2, 10, 9, 4), (3, 3, 1, 4),
                  dict(window_strides=(2, 2), padding="SAME",
                       feature_group_count=4)),
    "1d": ((2, 11, 3), (5, 3, 4),
           dict(window_strides=(2,), padding="SAME",
                dimension_numbers=("NWC", "WIO", "NWC"))),
    "nchw": ((2, 3, 10, 9), (4, 3, 3, 3),
             dict(window_strides=(2, 2), padding="SAME",
                  dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "nchw_in_nhwc_out": ((2, 3, 10, 9), (4, 3, 3, 3),
                         dict(window_strides=(1, 2),
                              padding=((2, 2), (0, 1)), rhs_dilation=(2, 1),
                              dimension_numbers=("NCHW", "OIHW", "NHWC"))),
    "3d": ((2, 5, 6, 7, 3), (3, 3, 3, 3, 2),
           dict(window_strides=(2, 1, 2), padding="SAME",
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
}

UNCOVERED = {
    "lhs_dilation": ((2, 5, 5, 3), (3, 3, 3, 4),
                     dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
                          lhs_dilation=(2, 2))),
    "batch_groups": ((4, 6, 6, 2), (3, 3, 2, 4),
                     dict(window_strides=(1, 1), padding="SAME",
                          batch_group_count=2)),
    "padding_wider_than_kernel": ((2, 6, 6, 3), (3, 3, 3, 4),
                                  dict(window_strides=(1, 1),
                                       padding=((3, 0), (0, 0)))),
}


def _operands(xs, ws, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=xs), dtype)
  w = jnp.asarray(rng.normal(size=ws) * 0.3, dtype)
  return x, w


def _kwargs(kw):
  kw = dict(kw)
  kw.setdefault("dimension_numbers", NHWC)
  return kw


def _loss(conv, kw, ct):
  return lambda x, w: jnp.sum(conv(x, w, **kw).astype(jnp.float32) * ct)


def _check_against_xla(xs, ws, kw, dtype=jnp.float32, jit=True, rtol=1e-5,
                       atol=1e-5):
  x, w = _operands(xs, ws, dtype)
  y_ref = lax.conv_general_dilated(x, w, **kw)
  y = optax_sam.conv_general_dilated(x, w, **kw)
  assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
  ct = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  grad = jax.grad(_loss(optax_sam.conv_general_dilated, kw, ct), (0, 1))
  grad = jax.jit(grad) if jit else grad
  g = grad(x, w)
  g_ref = jax.grad(_loss(lax.conv_general_dilated, kw, ct), (0, 1))(x, w)
  assert g[0].dtype == x.dtype and g[1].dtype == w.dtype
  assert_trees_close(y, y_ref, rtol=rtol, atol=atol)
  assert_trees_close(g, g_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("case", sorted(COVERED))
def test_covered_cases_equal_xla(case, jit):
  xs, ws, kw = COVERED[case]
  kw = _kwargs(kw)
  covered, why = optax_sam.forward_form_covers(xs, ws, **kw)
  assert covered, why
  _check_against_xla(xs, ws, kw, jit=jit)


@pytest.mark.parametrize("case", ["same_stride2", "depthwise", "nchw"])
def test_bf16(case):
  xs, ws, kw = COVERED[case]
  _check_against_xla(xs, ws, _kwargs(kw), dtype=jnp.bfloat16, rtol=2e-2,
                     atol=5e-2)


def test_bf16_with_float32_accumulation():
  xs, ws, kw = COVERED["same_stride2"]
  kw = _kwargs(kw) | {"preferred_element_type": jnp.float32}
  x, w = _operands(xs, ws, jnp.bfloat16)
  assert optax_sam.conv_general_dilated(x, w, **kw).dtype == jnp.float32
  _check_against_xla(xs, ws, kw, dtype=jnp.bfloat16, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("case", sorted(UNCOVERED))
def test_uncovered_cases_fall_back_to_xla(case):
  xs, ws, kw = UNCOVERED[case]
  kw = _kwargs(kw)
  covered, why = optax_sam.forward_form_covers(xs, ws, **kw)
  assert not covered and why
  x, w = _operands(xs, ws)
  fn = lambda x, w: jnp.sum(optax_sam.conv_general_dilated(x, w, **kw) ** 2)
  ref = lambda x, w: jnp.sum(lax.conv_general_dilated(x, w, **kw) ** 2)
  assert "custom_vjp" not in str(jax.make_jaxpr(jax.grad(fn))(x, w))
  np.testing.assert_array_equal(jax.grad(fn, (0, 1))(x, w)[1],
                                jax.grad(ref, (0, 1))(x, w)[1])


def test_covered_call_uses_custom_vjp():
  xs, ws, kw = COVERED["same"]
  x, w = _operands(xs, ws)
  jaxpr = str(jax.make_jaxpr(optax_sam.conv_general_dilated, static_argnums=(
      2, 3, 4, 5, 6))(x, w, (1, 1), "SAME", None, None, NHWC))
  assert "custom_vjp_call" in jaxpr


def test_gradients_inside_a_conditional():
  xs, ws, kw = COVERED["same_stride2"]
  kw = _kwargs(kw)
  x, w = _operands(xs, ws)
  loss = lambda w, conv: jnp.sum(jnp.tanh(conv(x, w, **kw)))

  @jax.jit
  def in_cond(pred, w):
    return lax.cond(pred,
                    lambda: jax.grad(loss)(w, optax_sam.conv_general_dilated),
                    lambda: jnp.zeros_like(w))

  np.testing.assert_allclose(in_cond(True, w),
                             jax.grad(loss)(w, lax.conv_general_dilated),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(in_cond(False, w), jnp.zeros_like(w))


# ---------------------------------------------------- forward_form_convs


def _two_conv_fn():
  xs, ws, _ = COVERED["same"]
  x, w = _operands(xs, ws)
  w2 = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 4, 2)) * 0.3,
                   jnp.float32)

  @jax.jit  # a jitted helper inside the loss is inlined and rewritten
  def block(h, k):
    return jax.nn.relu(lax.conv_general_dilated(h, k, (2, 2), "SAME",
                                                dimension_numbers=NHWC))

  def loss(params, x, scale, train):
    h = block(x, params["w"])
    h = jax.checkpoint(lambda h: lax.conv_general_dilated(
        h, params["w2"], (1, 1), "VALID", dimension_numbers=NHWC))(h)
    out = jnp.mean(jnp.square(h)) * scale
    return out if train else -out

  return loss, {"w": w, "w2": w2}, x


@pytest.mark.parametrize("jit", [True, False])
def test_forward_form_convs_equals_the_function(jit):
  loss, params, x = _two_conv_fn()
  rewritten = optax_sam.forward_form_convs(loss)
  for train in (True, False):  # a Python flag stays static
    g = jax.value_and_grad(rewritten)
    g = jax.jit(g, static_argnums=3) if jit else g
    v, grads = g(params, x, 2.0, train)
    v_ref, grads_ref = jax.value_and_grad(loss)(params, x, 2.0, train)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    assert_trees_close(grads, grads_ref, rtol=1e-5, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(rewritten, static_argnums=3)(params, x, 2.0,
                                                           True))
  assert jaxpr.count("custom_vjp_call") == 2
  assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_forward_form_convs_leaves_conv_free_functions_alone():
  fn = lambda p, x: jnp.sum(jnp.tanh(x @ p))
  p, x = jnp.ones((3, 2)), jnp.ones((4, 3))
  assert (str(jax.make_jaxpr(optax_sam.forward_form_convs(fn))(p, x))
          == str(jax.make_jaxpr(fn)(p, x)))


# ------------------------------------------------- models and make_update


class _LinenCNN(nn.Module):
  conv: object = lax.conv_general_dilated

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), conv_general_dilated=self.conv)(x))
    x = nn.Conv(4, (3, 3), strides=2, conv_general_dilated=self.conv)(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _linen_problem():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 2)),
                  jnp.float32)
  y = jnp.arange(4) % 3
  params = _LinenCNN().init(jax.random.PRNGKey(0), x)["params"]

  def make_loss(model):
    def loss(p, xb, yb):
      return optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": p}, xb), yb).mean()
    return loss

  return params, make_loss, x, y


def test_linen_one_line_wiring():
  params, make_loss, x, y = _linen_problem()
  g = jax.grad(make_loss(_LinenCNN(optax_sam.conv_general_dilated)))(
      params, x, y)
  g_ref = jax.grad(make_loss(_LinenCNN()))(params, x, y)
  assert_trees_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_nnx_one_line_wiring():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 2)),
                  jnp.float32)

  def grads(conv):
    layer = nnx.Conv(2, 3, (3, 3), strides=2, rngs=nnx.Rngs(0),
                     conv_general_dilated=conv)
    return nnx.grad(lambda m: jnp.sum(jnp.tanh(m(x))))(layer)

  g = grads(optax_sam.conv_general_dilated)
  g_ref = grads(lax.conv_general_dilated)
  assert_trees_close(nnx.state(g), nnx.state(g_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["sam", "layerwise_sam"])
def test_make_update_conv_backward_options_agree(method):
  params, make_loss, x, y = _linen_problem()
  loss = make_loss(_LinenCNN())
  make_tx = {"sam": lambda: optax_sam.sam(optax.sgd(0.1), rho=0.05),
             "layerwise_sam": lambda: optax_sam.layerwise_sam(
                 optax.sgd(0.1), rho=0.05, num_layers=1)}[method]
  out = {}
  for mode in ("forward", "xla"):
    tx = make_tx()
    step = optax_sam.make_update(tx, loss, conv_backward=mode)
    jaxpr = str(jax.make_jaxpr(step)(params, tx.init(params), x, y))
    assert ("custom_vjp_call" in jaxpr) == (mode == "forward")
    state = tx.init(params)
    p = params
    for _ in range(3):
      (_, _), u, state = jax.jit(step)(p, state, x, y)
      p = optax.apply_updates(p, u)
    out[mode] = p
  assert_trees_close(out["forward"], out["xla"], rtol=1e-4, atol=1e-5)
  # "auto" on the CPU: the forward form inside the method's conditional
  # branches (layer-wise SAM's switch), XLA's rule elsewhere (SAM).
  auto = optax_sam.make_update(make_tx(), loss)
  jaxpr = jax.make_jaxpr(auto)(params, make_tx().init(params), x, y)
  assert ("custom_vjp_call" in str(jaxpr)) == (method == "layerwise_sam")
  top = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  assert "custom_vjp_call" not in top  # the clean pass outside: XLA's rule


def test_auto_puts_the_forward_form_in_arsams_recompute_branch_only():
  params, make_loss, x, y = _linen_problem()
  tx = optax_sam.arsam(optax.sgd(0.1), rho=0.05)
  jaxpr = jax.make_jaxpr(optax_sam.make_update(tx, make_loss(_LinenCNN())))(
      params, tx.init(params), x, y).jaxpr
  conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == 1
  assert "custom_vjp_call" not in [e.primitive.name for e in jaxpr.eqns]
  branches = [str(b) for b in conds[0].params["branches"]]
  # Branch 0 recomputes (the engine's case order), branch 1 reuses.
  assert ["custom_vjp_call" in b for b in branches] == [True, False]


def test_make_update_rejects_unknown_conv_backward():
  with pytest.raises(ValueError, match="conv_backward"):
    optax_sam.make_update(optax_sam.sam(optax.sgd(0.1)), lambda p: 0.0,
                          conv_backward="fast")
  with pytest.raises(ValueError, match="conv_backward"):
    optax_sam.select_conv("fast")


def _flops(fn, *args):
  ca = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


def test_forward_form_keeps_the_static_subset_saving():
  """XLA still prunes the backward pass below the lowest perturbed layer."""
  params, make_loss, x, y = _linen_problem()
  loss = make_loss(_LinenCNN())
  groups = optax_sam.layer_groups(params)
  flops = {}
  for mode in ("forward", "xla"):
    for name, tx in (
        ("sgd", optax_sam.plain(optax.sgd(0.1))),
        ("sam", optax_sam.sam(optax.sgd(0.1))),
        ("last", optax_sam.sam(optax.sgd(0.1),
                               mask=groups.mask([groups.names[-1]])))):
      step = optax_sam.make_update(tx, loss, conv_backward=mode)
      flops[mode, name] = _flops(step, params, tx.init(params), x, y)
  for name in ("sgd", "sam", "last"):
    assert flops["forward", name] <= 1.05 * flops["xla", name], flops
  assert flops["forward", "last"] < 0.8 * flops["forward", "sam"], flops


def test_example_models_take_a_conv_backward():
  """The example ResNet with XLA's rule (no custom VJP in its gradient) and
  with the forward form (custom VJPs), equal gradients."""
  from optax_sam import models  # pylint: disable=g-import-not-at-top
  rule = "forward"
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  # Per-example, per-logit weights: with a plain sum of the logits, the
  # upstream gradient of every BatchNorm is constant over the batch, so every
  # gradient before the last BatchNorm is exactly zero in exact arithmetic
  # and the two rules would be compared on rounding noise.
  w = jnp.asarray(rng.normal(size=(2, 10)), jnp.float32)
  grads = {}
  for r in ("xla", rule):
    model = models.get_model("resnet18", width=2, conv_backward=r)
    # rbg: XLA compiles Flax's initialisers far faster than with threefry.
    variables = model.init(jax.random.key(0, impl="rbg"), x)
    loss = lambda p, model=model, v=variables: jnp.sum(w * model.apply(
        {"params": p, "batch_stats": v["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])[0])
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    assert ("custom_vjp_call" in jaxpr) == (r == "forward")
    grads[r] = jax.jit(jax.grad(loss))(variables["params"])
  # The first conv's kernel sits before every BatchNorm: its gradient is
  # the one a degenerate loss would zero.
  first = grads["xla"]["stage0_stem"]["a_conv"]["kernel"]
  assert float(jnp.max(jnp.abs(first))) > 1e-2, float(jnp.max(jnp.abs(first)))
  assert_trees_close(grads["xla"], grads[rule], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_forward_form_inside_the_switch_under_data_parallelism(mode):
  """layerwise_sam's switch branches, with the forward form, on 8 devices:
  replicas agree and equal the same step with XLA's rule."""
  from _util import N_DEV, replicate, shard_map_train, stack  # pylint: disable=g-import-not-at-top
  if jax.device_count() < N_DEV:
    pytest.skip("needs 8 devices (conftest.py sets XLA_FLAGS)")
  params, make_loss, _, _ = _linen_problem()
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2 * N_DEV, 8, 8, 2)), jnp.float32)
  y = jnp.arange(2 * N_DEV) % 3
  loss = make_loss(_LinenCNN())
  out = {}
  for rule in ("auto", "xla"):
    tx = optax_sam.layerwise_sam(optax.sgd(0.1), rho=0.05, num_layers=1,
                                 axis_name="dev")
    step = optax_sam.make_update(tx, loss, conv_backward=rule)
    state = tx.init(params)
    if mode == "pmap":
      _, u, _ = jax.pmap(step, axis_name="dev")(
          replicate(params), replicate(state), stack(x), stack(y))
      new = optax.apply_updates(replicate(params), u)
      for leaf in jax.tree.leaves(new):  # identical replicas
        np.testing.assert_array_equal(leaf[0], leaf[-1])
      out[rule] = jax.tree.map(lambda a: a[0], new)
    else:
      out[rule] = shard_map_train(step)(params, state, stack(x), stack(y))
  assert_trees_close(out["auto"], out["xla"], rtol=1e-4, atol=1e-6)
