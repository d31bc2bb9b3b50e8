"""Example Flax models: shapes, BatchNorm, depth order, losses, a SAM step."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from optax_sam import models

# XLA compiles Flax's initialisers far faster with the "rbg" generator than
# with threefry (about 1 s instead of 7 s for the tiny CNN on a CPU).
KEY = jax.random.key(0, impl="rbg")
IMG = jnp.linspace(0.0, 1.0, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
TOK = jnp.arange(2 * 8, dtype=jnp.int32).reshape(2, 8) % 11

# name -> (tiny kwargs, input, output shape)
TINY = {
    "mlp": (dict(hidden=(8, 8)), IMG, (2, 10)),
    "cnn": (dict(width=2, hidden=8), IMG, (2, 10)),
    "resnet18": (dict(width=2), IMG, (2, 10)),
    "wrn16_4": (dict(base_width=2, widen_factor=1), IMG, (2, 10)),
    "wrn28_10": (dict(base_width=1, widen_factor=1, depth=10), IMG, (2, 10)),
    "vit_tiny": (dict(hidden=8, num_layers=2, num_heads=2), IMG, (2, 10)),
    "char_lm": (dict(vocab_size=11, d_model=8, num_layers=2, num_heads=2,
                     max_len=8), TOK, (2, 8, 11)),
}


@functools.cache
def _init(name):
  kwargs, x, _ = TINY[name]
  model = models.get_model(name, **kwargs)
  return model, model.init(KEY, x), x


def _creation_order(tree, prefix=()):
  """Leaf paths in dict insertion order: the order Flax created them."""
  if isinstance(tree, dict):
    out = []
    for k, v in tree.items():
      out += _creation_order(v, prefix + (k,))
    return out
  return [prefix]


@pytest.mark.parametrize("name", sorted(TINY))
def test_shapes_and_depth_order(name):
  model, variables, x = _init(name)
  out = model.apply(variables, x, train=False)
  assert out.shape == TINY[name][2]
  assert bool(jnp.all(jnp.isfinite(out)))
  assert ("batch_stats" in variables) == (name in models.BATCHNORM_MODELS)
  params = variables["params"]
  groups = optax_sam.layer_groups(params)
  # Flatten order (what layer_groups uses) == the order the model created
  # its layers in the forward pass, i.e. input side first.
  created = []
  for path in _creation_order(params):
    label = "/".join(path[:-1]) or path[0]
    if label not in created:
      created.append(label)
  assert list(groups.names) == created, groups.describe()
  assert sum(groups.sizes) == sum(v.size for v in jax.tree.leaves(params))


def test_depth_names():
  _, v, _ = _init("cnn")
  names = [n for n, _ in optax_sam.layer_groups(v["params"]).describe()]
  assert names == [f"conv{i}" for i in range(6)] + ["dense0", "dense1"]
  # Twelve layers: zero-padded, so dense10 does not sort before dense02.
  mlp = models.MLP(hidden=(4,) * 11, num_classes=3)
  p = jax.eval_shape(mlp.init, KEY, IMG)["params"]
  assert optax_sam.layer_groups(p).names == tuple(
      f"dense{i:02d}" for i in range(12))
  assert models.depth_name("block", 3, 12) == "block03"
  _, v, _ = _init("resnet18")
  tops = []
  for n in optax_sam.layer_groups(v["params"]).names:
    if n.split("/")[0] not in tops:
      tops.append(n.split("/")[0])
  assert tops == (["stage0_stem"]
                  + [f"stage{s}_block{b}" for s in range(1, 5)
                     for b in range(2)] + ["stage5_head"])


def test_default_parameter_counts():
  def count(model, x):
    p = jax.eval_shape(model.init, KEY, x)["params"]
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(p))
  x32 = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  # The CIFAR ResNet-18 and WRN-16-4 of the literature (11.2M, 2.7M).
  assert count(models.get_model("resnet18"), x32) == 11_173_962
  assert count(models.get_model("wrn16_4"), x32) == 2_748_890
  assert count(models.SmallCNN(num_classes=10), x32) == 814_122


def test_batch_norm_train_and_eval():
  model, variables, x = _init("resnet18")
  logits, new = model.apply(variables, x, train=True,
                            mutable=["batch_stats"])
  assert logits.shape == (2, 10)
  old_s, new_s = variables["batch_stats"], new["batch_stats"]
  assert jax.tree.structure(old_s) == jax.tree.structure(new_s)
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(old_s), jax.tree.leaves(new_s)))
  # Eval mode uses the running averages and mutates nothing.
  ev = model.apply({"params": variables["params"], "batch_stats": new_s}, x,
                   train=False)
  assert ev.shape == (2, 10)
  with pytest.raises(Exception):
    model.apply(variables, x, train=True)  # batch_stats must be mutable


def test_lm_is_causal():
  model, v, tok = _init("char_lm")
  a = model.apply(v, tok)
  b = model.apply(v, tok.at[:, 5].set((tok[:, 5] + 1) % 11))
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert not np.allclose(a[:, 5:], b[:, 5:])
  untied = models.CharTransformerLM(vocab_size=11, d_model=8, num_layers=1,
                                    num_heads=2, max_len=8,
                                    tie_embeddings=False)
  p = jax.eval_shape(untied.init, KEY, tok)["params"]
  assert optax_sam.layer_groups(p).names[-1] == "stage3_head"
  with pytest.raises(ValueError, match="max_len"):
    model.apply(v, jnp.zeros((1, 9), jnp.int32))


def test_losses():
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
  y = jnp.array([0, 1])
  ref = -np.mean([jax.nn.log_softmax(logits[0])[0],
                  jax.nn.log_softmax(logits[1])[1]])
  np.testing.assert_allclose(models.cross_entropy(logits, y), ref, rtol=1e-6)
  np.testing.assert_allclose(models.accuracy(logits, y), 0.5)
  np.testing.assert_allclose(
      models.cross_entropy(logits, y, where=jnp.array([1, 0])),
      -jax.nn.log_softmax(logits[0])[0], rtol=1e-6)
  assert models.cross_entropy(logits, y, label_smoothing=0.1) > ref
  with pytest.raises(ValueError):
    models.cross_entropy(logits, jnp.array([0]))
  tokens = jnp.array([[0, 1, 2]])
  lm_logits = jnp.zeros((1, 2, 3))
  np.testing.assert_allclose(models.next_token_loss(lm_logits, tokens),
                             np.log(3.0), rtol=1e-6)


def test_loss_builders_and_dropout():
  model, v, x = _init("mlp")
  y = jnp.array([1, 2])
  fn, has_aux = models.make_loss_fn(model, v)
  assert not has_aux and fn(v["params"], x, y).shape == ()
  _, rv, _ = _init("resnet18")
  fn, has_aux = models.make_loss_fn(models.get_model("resnet18", width=2), rv)
  loss, (stats, logits) = fn(rv["params"], rv["batch_stats"], x, y)
  assert has_aux and logits.shape == (2, 10)
  assert jax.tree.structure(stats) == jax.tree.structure(rv["batch_stats"])
  metrics = models.eval_metrics(model)(v, x, y)
  assert set(metrics) == {"loss", "accuracy"}
  # Dropout: the trailing rng fixes the mask.
  vit = models.get_model("vit_tiny", hidden=8, num_layers=1, num_heads=2,
                         dropout_rate=0.5)
  p = vit.init(KEY, x)["params"]
  fn = models.classifier_loss(vit, dropout=True)
  k1, k2 = jax.random.split(KEY)
  assert fn(p, x, y, k1) == fn(p, x, y, k1)
  assert fn(p, x, y, k1) != fn(p, x, y, k2)
  with pytest.raises(TypeError, match="dropout rng"):
    fn(p, x, y)
  lm, lv, tok = _init("char_lm")
  windows = jnp.concatenate([tok, tok[:, :1]], axis=1)  # (B, T + 1)
  loss, logits = models.lm_loss(lm, return_logits=True)(lv["params"], windows)
  assert logits.shape == (2, 8, 11) and loss > 0


def test_get_model_errors():
  with pytest.raises(ValueError, match="unknown model"):
    models.get_model("resnet50")
  with pytest.raises(TypeError):
    models.get_model("mlp", no_such_attribute=1)
  assert set(TINY) == set(models.MODELS)


def test_sam_step_on_cnn():
  model, variables, _ = _init("cnn")
  params = variables["params"]
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 8, 8, 3))
  y = jnp.arange(8) % 10
  tx = optax_sam.sam(optax.sgd(0.1), rho=0.05)
  step = jax.jit(optax_sam.make_update(tx, models.classifier_loss(model)))
  state = tx.init(params)
  losses = []
  for _ in range(3):
    (loss, aux), updates, state = step(params, state, x, y)
    assert aux is None
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_sam_step_on_resnet18_with_batch_stats():
  model, variables, _ = _init("resnet18")
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3))
  y = jnp.arange(4)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax_sam.sam(optax.sgd(0.1), rho=0.05)
  step = jax.jit(optax_sam.make_update(
      tx, models.batchnorm_classifier_loss(model), has_aux=True))
  (loss, (new_stats, logits)), updates, _ = step(params, tx.init(params),
                                                 stats, x, y)
  assert np.isfinite(float(loss)) and logits.shape == (4, 10)
  assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats)))
  # The aux comes from the clean pass: the statistics of one plain forward.
  _, ref = model.apply(variables, x, train=True, mutable=["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               new_stats, ref["batch_stats"])


def test_core_package_does_not_import_flax():
  code = ("import sys, optax_sam; "
          "assert 'flax' not in sys.modules, 'flax imported'")
  subprocess.run([sys.executable, "-c", code], check=True)
