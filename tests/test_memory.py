"""Memory of every method against bounds: optimizer state and compiled temp.

On the MLP 16 -> 64 -> 8 with 64 rows (``_util.wide_mlp``; parameters 6432
bytes) and ``optax.sgd(0.1, momentum=0.9)`` as the base optimizer (whose
state is one params-shaped trace, 6432 bytes):

* optimizer-state bytes relative to the base optimizer's: the methods that
  store nothing between steps hold the base state plus a few scalars and
  per-layer vectors (< 10% of the parameters here, a constant in the model's
  size); the reuse methods (ARSAM, LookSAM, any ``schedule=``) hold one more
  params-shaped tree (the stored component) plus at most 1 KB (ARSAM's
  schedule history);
* ``temp_size_in_bytes`` of the compiled C2 step (``jax.jit(step).lower(
  ...).compile().memory_analysis()``) relative to the SGD step's (a
  hand-written ``value_and_grad`` + ``optax.sgd`` step), bounded per method
  with a margin that one more live activation-sized buffer would break.

``python -m pytest tests/test_memory.py -s`` prints the measured table.
"""

import jax
import jax.numpy as jnp
import pytest

from _util import (METHODS, committed, jax_loss, sgd_momentum, shared_step,
                   to_jax, wide_mlp)

REUSE = ("arsam", "looksam", "sharpness_aware")  # store a params-shaped tree
# Bounds on temp bytes / SGD's. Measured (jax 0.10.2, CPU): 1.00 (sam,
# asam, plain), 1.01-1.03 (looksam, layerwise_sam, arsam), 1.07 (slsam),
# 1.24 (sharpness_aware: a random layer, the ascent every third step, four
# switch branches). One more buffer the size of the hidden activations
# (64 x 64 float32, 16 KB) adds 0.5.
TEMP_BOUND = {"sam": 1.15, "asam": 1.15, "plain": 1.15, "layerwise_sam": 1.2,
              "arsam": 1.2, "looksam": 1.2, "slsam": 1.25,
              "sharpness_aware": 1.45}


def _nbytes(tree):
  total = 0
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total += leaf.nbytes
  return total


def _temp(compiled):
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def problem():
  p, x, y = wide_mlp(0)
  params = committed(to_jax(p))
  return params, committed((jnp.asarray(x), jnp.asarray(y)))


def _sgd_temp(params, x, y):
  opt = sgd_momentum()

  def sgd_step(q, st, xb, yb):
    loss, g = jax.value_and_grad(jax_loss)(q, xb, yb)
    u, st = opt.update(g, st, q)
    return loss, u, st

  compiled = jax.jit(sgd_step).lower(
      params, committed(opt.init(params)), x, y).compile()
  if compiled.memory_analysis() is None:
    pytest.skip(f"no memory_analysis on {jax.default_backend()}")
  return _temp(compiled)


@pytest.fixture(scope="module")
def sgd_temp(problem):
  params, (x, y) = problem
  return _sgd_temp(params, x, y)


@pytest.fixture(scope="module")
def table(problem, sgd_temp):
  params, (x, y) = problem
  base = _nbytes(sgd_momentum().init(params))
  rows = {}
  for name in METHODS:
    tx, step = shared_step(name, "c2")
    state = committed(tx.init(params))
    temp = _temp(step.lower(params, state, x, y).compile())
    rows[name] = (_nbytes(state), temp)
  print(f"\nparams {_nbytes(params)} B, base state (sgd momentum) {base} B, "
        f"SGD step temp {sgd_temp} B")
  print("| method | state bytes | x base | extra bytes | C2 temp bytes "
        "| x SGD temp |")
  print("|---|---|---|---|---|---|")
  for name, (sb, temp) in rows.items():
    print(f"| {name} | {sb} | {sb / base:.3f} | {sb - base} | {temp} | "
          f"{temp / sgd_temp:.2f} |")
  return base, _nbytes(params), rows


@pytest.mark.parametrize("name", list(METHODS))
def test_state_bytes(table, name):
  base, params_bytes, rows = table
  state_bytes, _ = rows[name]
  extra = state_bytes - base
  if name in REUSE:  # the stored component, shaped like the params
    assert params_bytes <= extra <= params_bytes + 1024, (
        name, state_bytes, base)
    assert 2.0 <= state_bytes / base <= 2.0 + 1024 / base
  else:  # scalars and per-layer vectors only
    assert 0 <= extra < 0.1 * params_bytes, (name, state_bytes, base)


@pytest.mark.parametrize("name", list(METHODS))
def test_temp_bytes(table, sgd_temp, name):
  _, temp = table[2][name]
  ratio = temp / sgd_temp
  assert ratio <= TEMP_BOUND[name], (name, temp, sgd_temp, ratio)


def test_bounds_are_not_vacuous(problem, table, sgd_temp):
  """The temp measure follows the activations (the SGD step on twice the
  rows needs at least 1.5x, beyond every bound), and the state bounds
  separate the two kinds of method."""
  params, (x, y) = problem
  double = _sgd_temp(params, jnp.concatenate([x, x]),
                     jnp.concatenate([y, y]))
  print(f"SGD step temp on {2 * x.shape[0]} rows: {double} B")
  assert double >= 1.5 * sgd_temp and 1.5 > max(TEMP_BOUND.values())
  base, params_bytes, rows = table
  assert base == params_bytes  # one momentum trace
  assert min(rows[n][0] for n in REUSE) > max(
      rows[n][0] for n in METHODS if n not in REUSE) + 0.9 * params_bytes
