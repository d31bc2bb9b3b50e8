"""Layer groups and masks."""

import jax.numpy as jnp
import numpy as np
import pytest

import optax_sam
from optax_sam._src.groups import mask_fraction



def _params():
  return {"params": {
      "Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
      "Dense_10": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
      "Dense_2": {"kernel": jnp.ones((3, 3))},
  }, "scale": jnp.ones(())}


def test_default_groups_by_parent_path_in_tree_order():
  g = optax_sam.layer_groups(_params())
  assert g.names == ("params/Dense_0", "params/Dense_10", "params/Dense_2",
                     "scale")
  assert g.sizes == (15, 8, 9, 1)
  assert g.describe()[0] == ("params/Dense_0", 15)
  assert g.labels["params"]["Dense_0"]["bias"] == "params/Dense_0"


def test_natural_and_explicit_order():
  g = optax_sam.layer_groups(_params(), order=optax_sam.natural_order)
  assert g.names == ("params/Dense_0", "params/Dense_2", "params/Dense_10",
                     "scale")
  names = ["scale", "params/Dense_2", "params/Dense_10", "params/Dense_0"]
  assert optax_sam.layer_groups(_params(), order=names).names == tuple(names)
  with pytest.raises(ValueError, match="every group exactly once"):
    optax_sam.layer_groups(_params(), order=names[:2])


def test_labels_as_function_and_pytree():
  g = optax_sam.layer_groups(
      _params(), labels=lambda path: "head" if "Dense_10" in path else "body")
  assert g.names == ("body", "head")
  assert g.sizes == (15 + 9 + 1, 8)
  labels = {"params": {"Dense_0": {"kernel": "a", "bias": "b"},
                       "Dense_10": {"kernel": "a", "bias": "b"},
                       "Dense_2": {"kernel": "a"}}, "scale": "b"}
  g2 = optax_sam.layer_groups(_params(), labels=labels)
  assert g2.names == ("b", "a")
  with pytest.raises(ValueError, match="same tree structure"):
    optax_sam.layer_groups(_params(), labels={"params": "x"})


def test_mask_from_names_and_positions():
  g = optax_sam.layer_groups(_params())
  m = g.mask(["params/Dense_2", -1])
  assert m["params"]["Dense_2"]["kernel"] is True
  assert m["scale"] is True
  assert m["params"]["Dense_0"]["kernel"] is False
  frac = mask_fraction(m, _params())
  np.testing.assert_allclose(frac, 10 / 33)
  with pytest.raises(ValueError, match="unknown layer group"):
    g.mask(["nope"])
  with pytest.raises(ValueError, match="empty"):
    g.mask([])


def test_empty_params_raise():
  with pytest.raises(ValueError, match="no leaves"):
    optax_sam.layer_groups({})
