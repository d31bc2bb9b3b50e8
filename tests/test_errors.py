"""Error messages a new user meets first: they name the key path and a fix."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_sam
from optax_sam._src import arguments

PARAMS = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
          "Dense_1": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
X = jnp.ones((4, 3))


def loss_fn(params, x):
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  return jnp.mean((h @ params["Dense_1"]["kernel"]
                   + params["Dense_1"]["bias"]) ** 2)


def _step(tx):
  return optax_sam.make_update(tx, loss_fn)(PARAMS, tx.init(PARAMS), X)


def test_mask_missing_a_leaf_names_its_key_path():
  mask = {"Dense_0": {"kernel": True, "bias": True},
          "Dense_1": {"kernel": True}}
  with pytest.raises(ValueError) as e:
    _step(optax_sam.sam(optax.sgd(0.1), mask=mask))
  message = str(e.value)
  assert "['Dense_1']['bias']" in message
  assert "optax_sam.layer_groups(params).mask(" in message
  assert "PyTreeDef" not in message


def test_mask_built_on_flax_variables():
  mask = optax_sam.layer_groups({"params": PARAMS}).mask(["params/Dense_1"])
  with pytest.raises(ValueError, match=re.escape("variables['params']")):
    _step(optax_sam.sam(optax.sgd(0.1), mask=mask))
  with pytest.raises(ValueError, match="did you mean 'params/Dense_1'"):
    optax_sam.layer_groups({"params": PARAMS}).mask(["Dense_1"])


def test_c1_gradient_of_another_structure():
  tx = optax_sam.sam(optax.sgd(0.1))
  grad_fn = lambda p, i: jax.grad(loss_fn)(p, X)
  grads = jax.grad(loss_fn)(PARAMS, X)
  with pytest.raises(ValueError) as e:
    tx.update({"params": grads}, tx.init(PARAMS), PARAMS, grad_fn=grad_fn)
  assert "extra top level ['params']" in str(e.value)
  del grads["Dense_0"]["bias"]
  with pytest.raises(ValueError, match=re.escape("['Dense_0']['bias']")):
    tx.update(grads, tx.init(PARAMS), PARAMS, grad_fn=grad_fn)


@pytest.mark.parametrize("make_tx", [
    lambda: optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05)),
    lambda: optax.sgd(0.1),
], ids=["contrib_sam", "sgd"])
def test_make_update_with_a_transformation_not_from_optax_sam(make_tx):
  with pytest.raises(TypeError, match=r"optax_sam\.plain"):
    _step(make_tx())


def test_an_optax_sam_method_error_is_not_hidden():
  # A method's own check that fails before any pass keeps its message.
  mask = {"Dense_0": {"kernel": True}}
  with pytest.raises(ValueError, match="same tree structure"):
    _step(optax_sam.sam(optax.sgd(0.1), mask=mask))
  tx = optax.inject_hyperparams(optax_sam.sam, static_args=("mask",))(
      optax.sgd(0.1), rho=0.05, mask=mask)
  with pytest.raises(ValueError, match="same tree structure"):
    _step(tx)


def test_structure_difference_cases():
  diff = arguments.structure_difference
  assert diff(PARAMS, PARAMS, "mask") is None
  tupled = {"a": (1, 2)}
  assert "tuple where params has a list" in diff(tupled, {"a": [1, 2]},
                                                 "mask")
  extra = dict(PARAMS, Dense_2={"kernel": 1})
  assert diff(extra, PARAMS, "mask") == (
      "mask has a leaf at ['Dense_2']['kernel'] that params lacks.")
  assert "that labels lacks" in diff({}, PARAMS, "labels")
