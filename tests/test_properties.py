"""Property tests (issue 15): every method factory, both call paths, random
pytrees, masks, labels, dtypes and gradients (zero, tiny, huge, inf, NaN).

Each case ends in one of:

* a clear error at construction, ``init`` or the first update
  (``ValueError``/``TypeError`` with a message);
* finite updates, finite parameters and a finite float state, with
  ``state.finite`` True;
* a reported non-finite step: ``state.finite`` False, and only when a
  gradient was non-finite or huge.

The one NaN a state may hold by design is a ``top_k`` policy's score of a
group it has never observed (``policies.top_k``: a statistic that
overflowed is not an observation): it may be NaN, never inf, and while
every score is NaN the selection is the initial one (:func:`_check_state`).

Compile cost dominates, so ``test_structures`` (new pytrees each example)
runs eagerly, one step, with the dense executor; ``test_values_jit``
compiles one step per (method, path, base optimizer) once, with the
method's default executor, and draws gradients as run-time inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import optax_sam
from optax_sam import policies, schedules

# Example counts follow the profile loaded in conftest.py ("default", or
# "ci" when CI is set): structures as many, compiled values twice as many
# (they cost no compilation).
_N = settings.default.max_examples
_SETTINGS = dict(deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------ the methods

LABELS = {
    "none": None,
    "leaf": lambda path: "/".join(path),
    "one": lambda path: "one",
}


def _factory(name, mask, labels, executor=None):
  """``opt -> tx`` for method ``name``; ``mask``/``labels`` where the method
  takes them; ``executor``: the method's default when None."""
  ex = {} if executor is None else {"executor": executor}
  return {
      "sam": lambda o: optax_sam.sam(o, mask=mask, per_layer=labels
                                     is not None, labels=labels, **ex),
      "asam": lambda o: optax_sam.asam(o, mask=mask, per_layer=labels
                                       is not None, labels=labels, **ex),
      "layerwise_sam": lambda o: optax_sam.layerwise_sam(
          o, num_layers=1, every=1, labels=labels, **ex),
      "arsam": lambda o: optax_sam.arsam(
          o, schedule=schedules.recompute_every(2), mask=mask,
          labels=labels, **ex),
      "looksam": lambda o: optax_sam.looksam(o, every=2, **ex),
      "slsam": lambda o: optax_sam.slsam(o, labels=labels, **ex),
      "sharpness_aware": lambda o: optax_sam.sharpness_aware(
          o, policy=policies.top_k(1), schedule=schedules.recompute_every(2),
          mask=mask, labels=labels, **ex),
      "plain": lambda o: optax_sam.plain(o),
  }[name]


METHODS = ("sam", "asam", "layerwise_sam", "arsam", "looksam", "slsam",
           "sharpness_aware", "plain")
TOP_K = ("layerwise_sam", "sharpness_aware")

# ------------------------------------------------------------- the pytrees

# A small menu of shapes and dtypes, so that eager op caches are reused.
LEAVES = [
    ((), jnp.float32), ((3,), jnp.float32), ((2, 3), jnp.float32),
    ((0,), jnp.float32), ((2, 0), jnp.float32), ((3,), jnp.bfloat16),
    ((2,), jnp.float16), None,
]
KINDS = (0.0, 1e-30, 1.0, -1.0, 1e30, np.inf, -np.inf, np.nan)

leaf_specs = st.sampled_from(range(len(LEAVES)))
FINITE_KINDS = [i for i, v in enumerate(KINDS) if np.isfinite(v)]


def step_kinds(n):
  """Indices into ``KINDS`` for ``n`` leaves: one kind for every leaf,
  finite kinds mixed, or any kinds mixed."""
  return st.one_of(
      st.sampled_from(range(len(KINDS))).map(lambda k: [k] * n),
      st.lists(st.sampled_from(FINITE_KINDS), min_size=n, max_size=n),
      st.lists(st.sampled_from(range(len(KINDS))), min_size=n, max_size=n))


def _trees(leaf):
  return st.recursive(
      leaf,
      lambda kids: st.one_of(
          st.dictionaries(st.sampled_from("abc"), kids, min_size=1,
                          max_size=3),
          st.lists(kids, min_size=1, max_size=2),
          st.tuples(kids, kids)),
      max_leaves=5)


def _build(spec, rng):
  """A params pytree from a spec of leaf indices (``None`` leaves kept)."""
  def leaf(i):
    entry = LEAVES[i]
    if entry is None:
      return None
    shape, dtype = entry
    return jnp.asarray(rng.uniform(0.5, 1.5, shape) *
                       rng.choice([-1, 1], shape), dtype)
  return jax.tree.map(leaf, spec)


def _float_leaves(tree):
  return [x for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x, np.float32))))
             for x in _float_leaves(tree))


def _check_state(name, state, initial_selection):
  """Every float of ``state`` finite, except a top_k score's NaN for a group
  never observed (then it must be NaN, not inf, and while every score is
  NaN the selection is still the initial one)."""
  if name in TOP_K:
    score = np.asarray(state.policy.score)
    assert not np.any(np.isinf(score)), score
    if np.all(np.isnan(score)):
      np.testing.assert_array_equal(np.asarray(state.policy.selection),
                                    initial_selection)
    state = state._replace(policy=state.policy._replace(
        score=jnp.where(jnp.isnan(state.policy.score), 0.0,
                        state.policy.score)))
  bad = [jax.tree_util.keystr(k) for k, x in
         jax.tree_util.tree_leaves_with_path(state)
         if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
         and not np.all(np.isfinite(np.asarray(x, np.float32)))]
  assert not bad, f"silent non-finite state in {bad}"


def _grads(params, kinds):
  """Gradients: per leaf, one value of ``KINDS`` times a +-1 pattern, as
  float32 arrays (cast to the leaf's dtype by the caller or by autodiff)."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for x, k in zip(leaves, kinds):
    sign = np.where(np.arange(max(x.size, 1))[:x.size] % 2 == 0, 1.0, -1.0)
    out.append(jnp.asarray((KINDS[k] * sign).reshape(x.shape), jnp.float32))
  return jax.tree.unflatten(treedef, out)


def _linear_loss(params, scales):
  """A loss whose gradient w.r.t. each leaf is ``scales`` (cast to the
  leaf's dtype): the same at every point, so both passes see it."""
  return sum(jnp.sum(jnp.asarray(p, jnp.float32) * s)
             for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(scales)))


def _step_fn(tx, path):
  if path == "c2":
    return optax_sam.make_update(tx, _linear_loss)

  def step(params, state, scales):
    g = jax.tree.map(lambda s, p: s.astype(p.dtype), scales, params)
    u, state = tx.update(g, state, params, grad_fn=lambda q, i: g)
    return (None, None), u, state
  return step


def _run(name, path, tx, step, params, grads_per_step, kinds_per_step,
         skipping=False, state=None):
  """Runs the steps; checks each ends finite or reported (never silent).
  ``skipping``: the base optimizer is ``optax.apply_if_finite``, so a
  reported step changes no parameter, leaves the state finite and the run
  goes on. ``state``: ``tx.init(params)``, if already computed."""
  state = tx.init(params) if state is None else state
  initial = (np.asarray(state.policy.selection) if name in TOP_K else None)
  assert bool(state.finite)
  for scales, kinds in zip(grads_per_step, kinds_per_step):
    _, updates, state = step(params, state, scales)
    cast = jax.tree.map(lambda s, p: np.asarray(s.astype(p.dtype),
                                                np.float32), scales, params)
    # Only a gradient entry that is non-finite or huge (>= 1e30) may make
    # a step non-finite (zero-size leaves have no entry).
    suspicious = any(np.any(~np.isfinite(c) | (np.abs(c) >= 1e30))
                     for c in jax.tree.leaves(cast))
    if bool(state.finite):
      assert _finite(updates), "finite=True but the updates are not finite"
      params = optax.apply_updates(params, updates)
      assert _finite(params)
      _check_state(name, state, initial)
      event("finite")
    else:
      assert suspicious, (
          f"{name}/{path}: a non-finite step reported for gradients "
          f"{[KINDS[k] for k in kinds]}")
      event("reported non-finite")
      if not skipping:
        return  # reported: the caller would skip it (or stop)
      for u in _float_leaves(updates):
        np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)
      _check_state(name, state, initial)


def _expected_error(e):
  assert isinstance(e, (ValueError, TypeError)), repr(e)
  assert str(e).strip(), f"an error without a message: {e!r}"
  event(f"error: {type(e).__name__}: {str(e)[:60]}")


# -------------------------------------------------------------- the tests


@settings(max_examples=_N, **_SETTINGS)
@given(data=st.data())
@pytest.mark.parametrize("path", ["c1", "c2"])
@pytest.mark.parametrize("name", METHODS)
def test_structures(name, path, data):
  """Random pytrees, masks, labels and gradients, one eager step."""
  spec = data.draw(_trees(leaf_specs), label="spec")
  rng = np.random.default_rng(0)
  params = _build(spec, rng)
  n = len(jax.tree.leaves(params))
  mask = data.draw(st.one_of(
      st.none(), st.lists(st.booleans(), min_size=n, max_size=n)),
      label="mask")
  if mask is not None:
    mask = jax.tree.unflatten(jax.tree.structure(params), mask)
  labels = LABELS[data.draw(st.sampled_from(sorted(LABELS)), label="labels")]
  kinds = data.draw(step_kinds(n), label="kinds")
  try:  # construction, init and the one update
    # The dense executor: the other executors' branches cost a compilation
    # per call outside jit (test_values_jit runs the defaults).
    tx = _factory(name, mask, labels, "dense")(optax.sgd(0.1, momentum=0.9))
    _run(name, path, tx, _step_fn(tx, path), params,
         [_grads(params, kinds)], [kinds])
  except (ValueError, TypeError) as e:
    _expected_error(e)


# One fixed tree (float32, bfloat16, float16, zero-size and None leaves);
# one step compiled per (method, path, base).
_FIXED = {"hidden": {"w": ((2, 3), jnp.float32), "b": ((3,), jnp.bfloat16)},
          "out": [((2,), jnp.float16), ((0,), jnp.float32), ((), jnp.float32)],
          "skip": None}
BASES = {
    "sgd": lambda: optax.sgd(0.1, momentum=0.9),
    # Skips the non-finite steps: the run goes on after a reported step.
    "skip": lambda: optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 100),
}


def _fixed_params():
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda e: jnp.asarray(rng.uniform(0.5, 1.5, e[0]), e[1]), _FIXED,
      is_leaf=lambda e: isinstance(e, tuple) and len(e) == 2
      and isinstance(e[0], tuple))


@functools.lru_cache(maxsize=None)
def _compiled(name, path, base):
  params = _fixed_params()
  # The method's default executor (slsam's "gated" runs in C2 only).
  tx = _factory(name, None, None,
                "dense" if name == "slsam" and path == "c1" else None)(
                    BASES[base]())
  return tx, jax.jit(_step_fn(tx, path)), params, tx.init(params)


# Each method in both paths and with both bases, each (path, base) pair for
# half of the methods: half the compilations of the full product.
_JIT_CASES = [(name, path, base) for i, name in enumerate(METHODS)
              for path, base in ((("c1", "sgd"), ("c2", "skip")) if i % 2 == 0
                                 else (("c2", "sgd"), ("c1", "skip")))]


@settings(max_examples=2 * _N, **_SETTINGS)
@given(data=st.data())
@pytest.mark.parametrize("name,path,base", _JIT_CASES)
def test_values_jit(name, path, base, data):
  """Four compiled steps, gradients drawn per step and leaf. With the
  ``skip`` base a reported step must leave the parameters and the whole
  state finite, and the run goes on."""
  tx, step, params, state = _compiled(name, path, base)
  n = len(jax.tree.leaves(params))
  kinds = data.draw(st.lists(step_kinds(n), min_size=4, max_size=4),
                    label="kinds")
  _run(name, path, tx, step, params, [_grads(params, k) for k in kinds],
       kinds, skipping=base == "skip", state=state)
