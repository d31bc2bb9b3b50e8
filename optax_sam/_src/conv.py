"""Convolutions whose backward pass is written as forward convolutions.

Why: on XLA's CPU backend, the gradients of a convolution run 10-40x slower
inside ``lax.cond``/``lax.switch`` than outside one. Every run-time choice
that saves work (the ``switch`` executor, ARSAM's recompute/reuse branches,
gated layers) runs inside a conditional. The cause is the dimension numbers
of XLA's own backward convolutions, not conditionals as such (DESIGN.md,
sec. 6c): written as *canonical forward convolutions* (NHWC input, HWIO
kernel, no batch grouping), both gradients are exact and as fast inside a
conditional as outside.

* input gradient: the output gradient convolved with the spatially flipped
  kernel, input and output features swapped, strides as ``lhs_dilation``
  (a transposed convolution);
* weight gradient: the input with batch and features swapped convolved with
  the output gradient as the kernel, the forward strides as
  ``rhs_dilation`` and the forward kernel dilation as the window stride.

Three ways to use it:

* :func:`conv_general_dilated`, a drop-in for
  ``jax.lax.conv_general_dilated``. One line in a model:
  ``nn.Conv(..., conv_general_dilated=optax_sam.conv_general_dilated)``
  (Linen and NNX both take that argument);
* :func:`forward_form_convs`, which rewrites every convolution a function
  runs (found by tracing it) into that form, for models you cannot edit;
* :func:`optax_sam.make_update` does the latter for you on the CPU
  (``conv_backward="auto"``), so the library's conditional branches run
  with it.

Covered: any number of spatial dimensions, any layout (the operands are
transposed to the canonical one, which costs nothing for NHWC/HWIO),
strides, explicit or ``"SAME"``/``"VALID"`` padding of at most the dilated
kernel size minus one on each side, kernel (``rhs``) dilation, feature
groups (depthwise included), ``precision``, ``preferred_element_type``, and
every floating dtype (bf16 included). Not covered, falling back to XLA's own
rule: input (``lhs``) dilation, i.e. transposed convolutions;
``batch_group_count > 1``; padding wider than the kernel or negative.
:func:`forward_form_covers` says which applies to a call.

References:
  Dumoulin, V. and Visin, F. (2016). A guide to convolution arithmetic for
  deep learning. arXiv:1603.07285 (the transposed-convolution identities).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend.core import primitives as jex_prims

ConvBackward = str  # "auto", "forward" or "xla"
CONV_BACKWARDS = ("auto", "forward", "xla")


class _Config(NamedTuple):
  """Static description of a canonical-layout convolution."""
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  rhs_dilation: tuple[int, ...]
  groups: int
  precision: Any
  preferred_element_type: Any


def _canonical_dn(nd: int) -> lax.ConvDimensionNumbers:
  """(N, spatial..., C) input and output, (spatial..., I, O) kernel."""
  spatial = tuple(range(1, nd + 1))
  lhs = (0, nd + 1) + spatial
  rhs = (nd + 1, nd) + tuple(range(nd))
  return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _conv(x, w, strides, padding, cfg: _Config, *, lhs_dilation=None,
          rhs_dilation=None, preferred=None):
  nd = x.ndim - 2
  return lax.conv_general_dilated(
      x, w, strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=_canonical_dn(nd),
      feature_group_count=cfg.groups, precision=cfg.precision,
      preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _canonical_conv(x: jax.Array, w: jax.Array, cfg: _Config) -> jax.Array:
  return _conv(x, w, cfg.strides, cfg.padding, cfg,
               rhs_dilation=cfg.rhs_dilation,
               preferred=cfg.preferred_element_type)


def _canonical_conv_fwd(x, w, cfg):
  return _canonical_conv(x, w, cfg), (x, w)


def _input_grad(cfg: _Config, x, w, dy) -> jax.Array:
  """d loss / d x as a transposed forward convolution."""
  nd = x.ndim - 2
  groups = cfg.groups
  ksize = w.shape[:nd]
  ci, co = x.shape[-1], w.shape[-1]
  pads = []
  for i in range(nd):
    lo, _ = cfg.padding[i]
    eff = (ksize[i] - 1) * cfg.rhs_dilation[i] + 1
    out_len = dy.shape[1 + i]
    pads.append((eff - 1 - lo,
                 x.shape[1 + i] + lo - (out_len - 1) * cfg.strides[i] - 1))
  # Flip spatially; per group, swap input and output features.
  kern = jnp.flip(w, tuple(range(nd)))
  kern = kern.reshape(ksize + (ci // groups, groups, co // groups))
  kern = jnp.transpose(kern, tuple(range(nd)) + (nd + 2, nd + 1, nd))
  kern = kern.reshape(ksize + (co // groups, ci))
  dtype = jnp.promote_types(dy.dtype, w.dtype)
  gx = _conv(dy.astype(dtype), kern.astype(dtype), (1,) * nd, pads, cfg,
             lhs_dilation=cfg.strides, rhs_dilation=cfg.rhs_dilation)
  return gx.astype(x.dtype)


def _weight_grad(cfg: _Config, x, w, dy) -> jax.Array:
  """d loss / d w as a forward convolution (batch and features swapped)."""
  nd = x.ndim - 2
  groups = cfg.groups
  n, ci = x.shape[0], x.shape[-1]
  ksize = w.shape[:nd]
  # (N, S..., C) -> (C/G, S..., G*N): the batch becomes the contracted
  # feature dimension, grouped like the forward convolution's features.
  lhs = x.reshape(x.shape[:-1] + (groups, ci // groups))
  lhs = jnp.transpose(lhs, (nd + 2,) + tuple(range(1, nd + 1)) + (nd + 1, 0))
  lhs = lhs.reshape((ci // groups,) + x.shape[1:-1] + (groups * n,))
  # (N, So..., Co) -> (So..., N, Co): the output gradient is the kernel.
  rhs = jnp.transpose(dy, tuple(range(1, nd + 1)) + (0, nd + 1))
  pads = []
  for i in range(nd):
    lo, _ = cfg.padding[i]
    # High padding that makes the output exactly the kernel size.
    hi = ((ksize[i] - 1) * cfg.rhs_dilation[i]
          + (dy.shape[1 + i] - 1) * cfg.strides[i] + 1 - x.shape[1 + i] - lo)
    if hi < 0:  # the last input rows are never read: drop them
      lhs = lax.slice_in_dim(lhs, 0, x.shape[1 + i] + hi, axis=1 + i)
      hi = 0
    pads.append((lo, hi))
  dtype = jnp.promote_types(dy.dtype, x.dtype)
  gw = _conv(lhs.astype(dtype), rhs.astype(dtype), cfg.rhs_dilation, pads,
             cfg, rhs_dilation=cfg.strides)
  # (C/G, K..., Co) -> (K..., C/G, Co)
  gw = jnp.transpose(gw, tuple(range(1, nd + 1)) + (0, nd + 1))
  return gw.astype(w.dtype)


def _canonical_conv_bwd(cfg, res, dy):
  x, w = res
  return _input_grad(cfg, x, w, dy), _weight_grad(cfg, x, w, dy)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _as_tuple(v: Optional[Sequence[int]], nd: int) -> tuple[int, ...]:
  return (1,) * nd if v is None else tuple(int(a) for a in v)


class _Plan(NamedTuple):
  cfg: _Config
  lhs_perm: tuple[int, ...]
  rhs_perm: tuple[int, ...]
  out_perm: tuple[int, ...]


def _plan(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation,
          rhs_dilation, dimension_numbers, feature_group_count,
          batch_group_count, precision, preferred_element_type
          ) -> tuple[Optional[_Plan], str]:
  """The canonical-layout plan of a convolution, or None and the reason."""
  nd = len(lhs_shape) - 2
  if nd < 1:
    return None, "needs at least one spatial dimension"
  if any(d != 1 for d in _as_tuple(lhs_dilation, nd)):
    return None, "input (lhs) dilation, i.e. a transposed convolution"
  if batch_group_count != 1:
    return None, "batch_group_count > 1"
  dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  lhs_perm = (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],)
  rhs_perm = tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0])
  strides = _as_tuple(window_strides, nd)
  rdil = _as_tuple(rhs_dilation, nd)
  in_spatial = tuple(lhs_shape[a] for a in lhs_perm[1:-1])
  ksize = tuple(rhs_shape[a] for a in rhs_perm[:nd])
  eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, rdil))
  if isinstance(padding, str):
    pads = tuple(tuple(int(v) for v in p) for p in
                 lax.padtype_to_pads(in_spatial, eff, strides, padding))
  else:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != nd:
    return None, "padding does not match the spatial dimensions"
  for (lo, hi), e in zip(pads, eff):
    if not (0 <= lo <= e - 1 and 0 <= hi <= e - 1):
      return None, "padding negative or wider than the dilated kernel - 1"
  # Output axis a holds logical dimension j of (batch, feature, spatial...);
  # the canonical result holds them as (batch, spatial..., feature).
  canon_pos = (0, nd + 1) + tuple(range(1, nd + 1))
  out_perm = [0] * (nd + 2)
  for j, axis in enumerate(dn.out_spec):
    out_perm[axis] = canon_pos[j]
  pref = (None if preferred_element_type is None
          else np.dtype(preferred_element_type))
  cfg = _Config(strides, pads, rdil, int(feature_group_count), precision,
                pref)
  return _Plan(cfg, lhs_perm, rhs_perm, tuple(out_perm)), ""


def _transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
  return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def forward_form_covers(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
                        window_strides: Sequence[int],
                        padding: Union[str, Sequence[tuple[int, int]]],
                        lhs_dilation: Optional[Sequence[int]] = None,
                        rhs_dilation: Optional[Sequence[int]] = None,
                        dimension_numbers: Any = None,
                        feature_group_count: int = 1,
                        batch_group_count: int = 1) -> tuple[bool, str]:
  """Whether :func:`conv_general_dilated` uses the forward-form backward.

  Returns:
    ``(covered, reason)``; ``reason`` says why not when ``covered`` is False
    (then XLA's own gradient rule is used).
  """
  plan, why = _plan(tuple(lhs_shape), tuple(rhs_shape), window_strides,
                    padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count, batch_group_count, None, None)
  return plan is not None, why


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Union[str, Sequence[tuple[int, int]]],
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
  """``jax.lax.conv_general_dilated`` with a forward-form backward pass.

  Same arguments and the same forward result as
  ``jax.lax.conv_general_dilated``; its gradients equal those of XLA's rule
  up to floating-point summation order, and are computed by canonical
  forward convolutions, which XLA's CPU backend runs as fast inside
  ``lax.cond``/``lax.switch`` as outside (see the module docstring for what
  is covered; uncovered calls use XLA's rule).

  Example (Flax Linen or NNX)::

    nn.Conv(64, (3, 3), conv_general_dilated=optax_sam.conv_general_dilated)
  """
  plan, _ = _plan(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                  rhs_dilation, dimension_numbers, feature_group_count,
                  batch_group_count, precision, preferred_element_type)
  if (plan is None or out_sharding is not None
      or not (jnp.issubdtype(lhs.dtype, jnp.floating)
              and lhs.dtype == rhs.dtype)):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type, out_sharding=out_sharding)
  out = _canonical_conv(_transpose(lhs, plan.lhs_perm),
                        _transpose(rhs, plan.rhs_perm), plan.cfg)
  return _transpose(out, plan.out_perm)


# ----------------------------------------------------- rewriting a function


def _subjaxprs(eqn) -> list[Any]:
  out = []
  for v in eqn.params.values():
    vs = v if isinstance(v, (tuple, list)) else (v,)
    for j in vs:
      if isinstance(j, jex_core.ClosedJaxpr):
        out.append(j.jaxpr)
      elif isinstance(j, jex_core.Jaxpr):
        out.append(j)
  return out


def _any_conv(jaxpr) -> bool:
  """Whether ``jaxpr`` runs a convolution anywhere (nested jaxprs too)."""
  return any(eqn.primitive is jex_prims.conv_general_dilated_p
             or any(_any_conv(j) for j in _subjaxprs(eqn))
             for eqn in jaxpr.eqns)


def _trace(fn: Callable[..., Any], args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
  """``fn(*args, **kwargs)`` as a closed jaxpr over its array arguments
  (the others stay static): ``(closed_jaxpr, out_shape, arrays)``."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  traced = [i for i, x in enumerate(leaves) if _is_array(x)]

  def flat_fn(*dyn):
    full = list(leaves)
    for i, x in zip(traced, dyn):
      full[i] = x
    a, k = jax.tree.unflatten(treedef, full)
    return fn(*a, **k)

  dyn = [leaves[i] for i in traced]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dyn)
  return closed, out_shape, dyn


def runs_convolutions(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fn(*args)`` runs a convolution (traced, not run)."""
  return _any_conv(_trace(fn, args, {})[0].jaxpr)


def _has_conv(jaxpr) -> bool:
  """Whether :func:`_eval` would rewrite a convolution of ``jaxpr``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive is jex_prims.conv_general_dilated_p:
      return True
    if eqn.primitive in (jex_prims.jit_p, jex_prims.remat_p) and any(
        _has_conv(j) for j in _subjaxprs(eqn)):
      return True
  return False


def _bind(eqn, invals: Sequence[Any]) -> list[Any]:
  """Binds ``eqn``'s primitive as the jaxpr has it (XLA's rules)."""
  prim = eqn.primitive
  params = prim.get_bind_params(eqn.params)
  subfuns: Sequence[Any] = ()
  if isinstance(params, tuple):  # jax < 0.7: (subfuns, params)
    subfuns, params = params
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx is None:
    out = prim.bind(*subfuns, *invals, **params)
  else:
    with ctx:
      out = prim.bind(*subfuns, *invals, **params)
  return list(out) if prim.multiple_results else [out]


def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  """Evaluates ``jaxpr`` with every reachable convolution in forward form.

  Convolutions at the top level, inside ``jit`` (inlined) and inside
  ``jax.checkpoint`` (kept as a checkpoint) are rewritten; other
  higher-order primitives (``cond``, ``scan``, custom derivatives) are bound
  as they are, with XLA's rule.
  """
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def write(v, x):
    if not isinstance(v, jex_core.DropVar):
      env[v] = x

  for v, x in zip(jaxpr.constvars, consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, args):
    write(v, x)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    prim = eqn.primitive
    if prim is jex_prims.conv_general_dilated_p:
      outvals = [conv_general_dilated(*invals, **eqn.params)]
    elif prim is jex_prims.jit_p and _has_conv(eqn.params["jaxpr"].jaxpr):
      inner = eqn.params["jaxpr"]
      outvals = _eval(inner.jaxpr, inner.consts, invals)
    elif prim is jex_prims.remat_p and _has_conv(eqn.params["jaxpr"]):
      inner = eqn.params["jaxpr"]
      fn = jax.checkpoint(lambda *a, inner=inner: _eval(inner, (), a),
                          prevent_cse=eqn.params.get("prevent_cse", True),
                          policy=eqn.params.get("policy"))
      outvals = fn(*invals)
    else:
      outvals = _bind(eqn, invals)
    for v, x in zip(eqn.outvars, outvals):
      write(v, x)
  return [read(v) for v in jaxpr.outvars]


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def forward_form_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with every convolution it runs given a forward-form backward.

  Traces ``fn`` (array arguments traced, everything else, such as a Python
  ``train`` flag, held static) and re-evaluates its program with each
  ``conv_general_dilated`` replaced by :func:`conv_general_dilated`. Values
  are unchanged; gradients equal XLA's up to summation order. A function
  that runs no convolution is called as it is.

  Args:
    fn: any JAX-traceable function, e.g. a ``loss_fn(params, *args)``.

  Returns:
    A function with the same signature and results.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    closed, out_shape, dyn = _trace(fn, args, kwargs)
    if not _has_conv(closed.jaxpr):
      return fn(*args, **kwargs)
    out = _eval(closed.jaxpr, closed.consts, dyn)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def select_conv(conv_backward: ConvBackward = "auto"
                ) -> Callable[..., jax.Array]:
  """A ``conv_general_dilated`` for models, by backward rule.

  Args:
    conv_backward: ``"forward"`` (:func:`conv_general_dilated`), ``"xla"``
      (``jax.lax.conv_general_dilated``) or ``"auto"``: the forward form on
      the CPU and XLA's rule elsewhere, decided when the model is traced.

  Returns:
    A function with ``jax.lax.conv_general_dilated``'s signature, e.g. for
    ``nn.Conv(..., conv_general_dilated=optax_sam.select_conv())``.
  """
  resolve_conv_backward(conv_backward)  # validates
  if conv_backward == "forward":
    return conv_general_dilated
  if conv_backward == "xla":
    return lax.conv_general_dilated

  def auto(*args, **kwargs):
    fn = (conv_general_dilated if resolve_conv_backward("auto")
          else lax.conv_general_dilated)
    return fn(*args, **kwargs)

  return auto


def resolve_conv_backward(conv_backward: ConvBackward) -> bool:
  """Whether ``conv_backward`` means the forward form on this backend.

  ``"auto"`` is the forward form on the CPU (where XLA's rule is slow
  inside conditionals) and XLA's rule elsewhere (not measured better on GPU
  or TPU yet).
  """
  if conv_backward not in CONV_BACKWARDS:
    raise ValueError(f"conv_backward must be one of {CONV_BACKWARDS}, got "
                     f"{conv_backward!r}.")
  if conv_backward == "auto":
    return jax.default_backend() == "cpu"
  return conv_backward == "forward"
