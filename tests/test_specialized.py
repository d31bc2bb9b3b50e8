"""SpecializedStep drives reuse methods (ARSAM, LookSAM) without lax.cond."""

import jax
import numpy as np
import optax
import pytest

import optax_sam
from _util import assert_trees_close, jax_loss, setup, to_jax


@pytest.mark.parametrize("make", [
    lambda: optax_sam.looksam(optax.sgd(0.1, momentum=0.9), k=3),
    lambda: optax_sam.arsam(optax.sgd(0.1, momentum=0.9), schedule=(
        optax_sam.recompute_with_probability(0.4)), seed=1),
], ids=["looksam", "arsam_bernoulli"])
def test_specialized_equals_cond(make):
  p, x, y = setup(0)
  tx = make()
  params = to_jax(p)
  ref = jax.jit(optax_sam.make_update(tx, jax_loss))
  spec = optax_sam.SpecializedStep(tx, jax_loss)
  a = (params, tx.init(params))
  b = (params, tx.init(params))
  flags = []
  for _ in range(9):
    _, u, s = ref(*a, x, y)
    a = (optax.apply_updates(a[0], u), s)
    _, u2, s2 = spec(*b, x, y)
    b = (optax.apply_updates(b[0], u2), s2)
    assert bool(s.recomputed) == bool(s2.recomputed)
    flags.append(bool(s.recomputed))
    assert_trees_close(a[0], b[0], rtol=1e-6, atol=1e-7)
  assert len(set(flags)) == 2, "both branches should run"
  assert spec.compilations == 2
