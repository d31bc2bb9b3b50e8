"""optax_sam.nnx: both call paths with nnx.Optimizer, against plain pytrees."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")

import optax_sam  # pylint: disable=g-import-not-at-top
import optax_sam.nnx as osn  # pylint: disable=g-import-not-at-top

LR, RHO, STEPS = 0.1, 0.1, 2


class _MLP(nnx.Module):

  def __init__(self, rngs, batch_norm=False):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs) if batch_norm else None
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = self.l1(x)
    if self.bn is not None:
      h = self.bn(h)
    return self.l2(jax.nn.relu(h))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _pure_loss(p, x, y):
  """The same MLP on a plain dict of arrays (the Linen-style path)."""
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batch():
  x = jax.random.normal(jax.random.key(1), (16, 4))
  return x, jnp.arange(16) % 3


@pytest.fixture(scope="module")
def batch():
  return _batch()


def _as_dict(model):
  return {k: {n: np.asarray(getattr(getattr(model, k), n)[...])
              for n in ("kernel", "bias")} for k in ("l1", "l2")}


@functools.lru_cache(maxsize=None)
def _reference(method):
  """STEPS steps of the core's C2 on the pure dict copy of the model."""
  tx, batch = _TXS[method](), _batch()
  params = _as_dict(_MLP(nnx.Rngs(0)))
  params = jax.tree.map(jnp.asarray, params)
  step = jax.jit(optax_sam.make_update(tx, _pure_loss))
  state = tx.init(params)
  for _ in range(STEPS):
    _, u, state = step(params, state, *batch)
    params = optax.apply_updates(params, u)
  return params, state


def _c1(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  optimizer.update(model, grads, grad_fn=osn.grad_fn(model, _loss, x, y))
  return loss


_TXS = {
    "sam": lambda: optax_sam.sam(optax.sgd(LR), rho=RHO),
    "layerwise_sam": lambda: optax_sam.layerwise_sam(
        optax.sgd(LR, momentum=0.9), rho=RHO, num_layers=1, every=1,
        executor="dense"),
}


@pytest.mark.parametrize("method", sorted(_TXS))
@pytest.mark.parametrize("path", ["c1", "c2"])
def test_matches_pytree_path(batch, method, path):
  want, want_state = _reference(method)
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _TXS[method](), wrt=nnx.Param)
  step = nnx.jit(_c1 if path == "c1" else osn.make_update(_loss))
  for _ in range(STEPS):
    loss = step(model, optimizer, *batch)
  assert np.isfinite(float(loss))
  got = _as_dict(model)
  for k in want:
    for n in want[k]:
      np.testing.assert_allclose(got[k][n], want[k][n], rtol=1e-5, atol=1e-6)
  assert int(optimizer.step[...]) == STEPS
  # The policy's state follows the pure path's (same layer groups).
  np.testing.assert_array_equal(
      np.asarray(optimizer.opt_state.last_selection[...]),
      np.asarray(want_state.last_selection))


def test_c1_and_c2_agree_with_batch_norm(batch):
  models = [_MLP(nnx.Rngs(0), batch_norm=True) for _ in range(2)]
  opts = [nnx.Optimizer(m, optax_sam.sam(optax.sgd(LR), rho=RHO),
                        wrt=nnx.Param) for m in models]
  steps = [nnx.jit(_c1), nnx.jit(osn.make_update(_loss))]
  for _ in range(STEPS):
    losses = [s(m, o, *batch) for s, m, o in zip(steps, models, opts)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
  a, b = (nnx.as_pure(nnx.state(m)) for m in models)
  # Params and the BatchNorm statistics (written by the clean pass).
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  mean = np.asarray(models[1].bn.mean[...])
  assert np.abs(mean).max() > 0  # the statistics moved


def test_aux_and_type_errors(batch):
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(LR)),
                            wrt=nnx.Param)
  step = nnx.jit(osn.make_update(lambda m, x, y: (_loss(m, x, y), m(x)),
                                 has_aux=True))
  loss, logits = step(model, optimizer, *batch)
  assert logits.shape == (16, 3) and np.isfinite(float(loss))
  with pytest.raises(TypeError, match="nnx.Optimizer"):
    osn.make_update(_loss)(model, optax_sam.sam(optax.sgd(LR)), *batch)


def test_param_wrapped_grads_get_a_short_hint(batch):
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(LR)),
                            wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def wrapped_grad_fn(params, i):  # returns Param-wrapped gradients
    del i
    return nnx.grad(_loss)(nnx.merge(graphdef, params, rest), *batch)

  grads = nnx.grad(_loss)(model, *batch)
  with pytest.raises(ValueError, match="optax_sam.nnx") as err:
    optimizer.update(model, grads, grad_fn=wrapped_grad_fn)
  assert "nnx.as_pure" in str(err.value) and len(str(err.value)) < 300
