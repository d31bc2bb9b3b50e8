"""Building blocks shared by the example models: naming, attention, blocks.

Naming convention (all models in ``optax_sam.models``)
------------------------------------------------------
``jax`` flattens a dict by *sorted key*, and ``optax_sam`` takes the order in
which the parameter tree flattens as the default depth order of its layer
groups. Flax's automatic names break that order (``Dense_10`` sorts before
``Dense_2``; ``BatchNorm_0`` sorts before ``Conv_0``), so every parameterised
submodule here has an explicit name chosen to sort in depth order:

* a run of layers of one kind is named ``{prefix}{i}`` with ``i`` zero-padded
  to the width of the largest index (:func:`depth_name`): ``conv0 .. conv5``
  for six layers, ``dense00 .. dense11`` for twelve;
* top-level parts of composite models are ``stage{k}_{what}``
  (``stage0_stem``, ``stage1_block0``, ..., ``stage5_head``);
* sublayers inside a block are prefixed by a letter in forward order
  (``a_conv``, ``b_bn``, ``c_conv``, ``d_bn``, ``e_shortcut``).

Group names stay readable (``params/stage2_block1/c_conv``) and
``jax.tree.leaves(params)`` lists layers input side first.

References:
  Vaswani, A. et al. (2017). Attention is all you need. NeurIPS.
  Xiong, R. et al. (2020). On layer normalization in the Transformer
  architecture. ICML (pre-LN blocks).
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def depth_name(prefix: str, index: int, count: int) -> str:
  """Name of layer ``index`` of ``count`` so that names sort in depth order.

  The index is zero-padded to the number of digits of ``count - 1``, so up to
  ten layers get single digits (``conv0 .. conv9``) and more get padding
  (``conv00 .. conv11``).

  Args:
    prefix: the layer kind, e.g. ``"conv"``.
    index: position of the layer, ``0 <= index < count``.
    count: number of layers of this kind in the same parent module.

  Returns:
    The name, e.g. ``depth_name("dense", 3, 12) == "dense03"``.
  """
  if not 0 <= index < max(count, 1):
    raise ValueError(f"index {index} out of range for count {count}.")
  width = len(str(max(count - 1, 0)))
  return f"{prefix}{index:0{width}d}"


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused QKV projection.

  Attributes:
    num_heads: number of attention heads; must divide the model width.
    causal: if ``True``, position ``t`` attends only to positions ``<= t``.
    dropout_rate: dropout on the attention weights (active when ``train``).
  """
  num_heads: int
  causal: bool = False
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    _, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(
          f"width {d} is not divisible by num_heads={self.num_heads}.")
    head_dim = d // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), name="a_qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, Dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    if self.causal:
      mask = jnp.tril(jnp.ones((t, t), dtype=bool))
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(d, axis=(-2, -1), name="b_out")(out)


class MlpBlock(nn.Module):
  """Position-wise feed-forward block ``Dense -> GELU -> Dense``."""
  hidden: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    d = x.shape[-1]
    h = nn.gelu(nn.Dense(self.hidden, name="a_fc")(x))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    return nn.Dense(d, name="b_fc")(h)


class TransformerBlock(nn.Module):
  """Pre-LN Transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the feed-forward block.
    causal: causal self-attention (decoder) or full (encoder).
    dropout_rate: dropout on attention weights and residual branches.
  """
  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    drop = nn.Dropout(self.dropout_rate)
    h = nn.LayerNorm(name="a_ln")(x)
    h = SelfAttention(self.num_heads, causal=self.causal,
                      dropout_rate=self.dropout_rate, name="b_attn")(h, train)
    x = x + drop(h, deterministic=not train)
    h = nn.LayerNorm(name="c_ln")(x)
    h = MlpBlock(self.mlp_dim, self.dropout_rate, name="d_mlp")(h, train)
    return x + drop(h, deterministic=not train)


def check_divisible(name: str, value: int, divisor: Optional[int]) -> None:
  if divisor and value % divisor:
    raise ValueError(f"{name}={value} must be divisible by {divisor}.")
