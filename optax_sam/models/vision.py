"""Image classifiers in Flax Linen: MLP, SmallCNN, ResNet-18, WRN, ViT.

All models map images ``(B, H, W, C)`` (e.g. 28x28x1 Fashion-MNIST, 8x8x1
digits, 32x32x3) to logits ``(B, num_classes)``, take ``train: bool`` in
``__call__`` (ignored by models without BatchNorm or dropout) and have a width
argument so tests can build tiny versions. Parameters are plain pytrees, so
``loss_fn(params, x, y)`` built from ``model.apply`` fits ``optax_sam``'s
functional contract; see :mod:`optax_sam.models.losses`.

BatchNorm models (:class:`ResNet18`, :class:`WideResNet`) keep their running
statistics in the ``batch_stats`` collection: call
``model.apply({"params": p, "batch_stats": s}, x, train=True,
mutable=["batch_stats"])`` in training and ``train=False`` (no mutation) for
evaluation. ``bn_axis_name`` makes BatchNorm average its batch statistics over
a named ``pmap``/``shard_map`` axis.

Submodules are named so that the parameter tree flattens in depth order (see
:mod:`optax_sam.models.layers`).

Every model with convolutions (SmallCNN, ResNet18, WideResNet, ViT's patch
embedding) takes ``conv_backward`` (see :func:`optax_sam.select_conv`):
``"xla"`` (default) keeps XLA's gradient rule in the model, and
:func:`optax_sam.make_update` turns the convolutions of the passes that run
inside the library's conditional branches into the forward form on the CPU
(XLA's rule is 10-40x slower there); ``"forward"`` puts the forward form in
the model itself, e.g. for C1 steps that differentiate inside a user's own
``lax.cond``; ``"auto"`` is ``"forward"`` on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_sam._src.conv import select_conv
from optax_sam.models.layers import TransformerBlock
from optax_sam.models.layers import depth_name

Array = jax.Array

# He (fan-out) initialisation, as in the reference ResNet/WRN code.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(module: nn.Module, *args, **kwargs) -> nn.Conv:
  """``nn.Conv`` whose gradients follow ``module.conv_backward`` (see the
  module docstring)."""
  return nn.Conv(*args,
                 conv_general_dilated=select_conv(module.conv_backward),
                 **kwargs)


def _batch_norm(train: bool, axis_name: Optional[str], name: str) -> nn.Module:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, axis_name=axis_name, name=name)


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs.

  Layers are ``dense0 .. dense{n}`` (the last one is the classifier).

  Attributes:
    hidden: widths of the hidden layers.
    num_classes: number of output logits.
    layer_norm: a LayerNorm (``norm0 ..``) after each hidden layer's dense
      (for SAM-ON, which perturbs normalization parameters only).
  """
  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  layer_norm: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train  # no BatchNorm or dropout
    x = x.reshape((x.shape[0], -1))
    widths = tuple(self.hidden) + (self.num_classes,)
    for i, w in enumerate(widths):
      x = nn.Dense(w, name=depth_name("dense", i, len(widths)))(x)
      if i < len(widths) - 1:
        if self.layer_norm:
          x = nn.LayerNorm(name=depth_name("norm", i, len(widths) - 1))(x)
        x = nn.relu(x)
    return x


class SmallCNN(nn.Module):
  """Six 3x3 conv layers and two dense layers (the CNN of DESIGN.md, sec. 3).

  ``conv0..conv5`` with widths ``(w, w, 2w, 2w, 4w, 4w)``, ReLU, and a 2x2
  average pool after every second conv; then flatten, ``dense0`` (``hidden``
  units, ReLU) and ``dense1`` (logits). Works on 28x28 (pooled to 3x3) and
  32x32 (pooled to 4x4) inputs; no BatchNorm.

  Attributes:
    num_classes: number of output logits.
    width: channels of the first conv layers (``w`` above).
    hidden: units of ``dense0``.
  """
  num_classes: int = 10
  width: int = 32
  hidden: int = 256
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    w = self.width
    for i, c in enumerate((w, w, 2 * w, 2 * w, 4 * w, 4 * w)):
      x = nn.relu(_conv(self, c, (3, 3), padding="SAME", name=f"conv{i}")(x))
      if i % 2 == 1:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name="dense0")(x))
    return nn.Dense(self.num_classes, name="dense1")(x)


class _ResidualShortcut(nn.Module):
  """1x1 strided conv + BatchNorm projection for a shape-changing block."""
  features: int
  strides: int
  bn_axis_name: Optional[str] = None
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = _conv(self, self.features, (1, 1), strides=self.strides, use_bias=False,
              kernel_init=_conv_init, name="a_conv")(x)
    return _batch_norm(train, self.bn_axis_name, "b_bn")(x)


class BasicBlock(nn.Module):
  """Post-activation ResNet basic block (two 3x3 convs), He et al. 2016.

  ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; the shortcut is the
  identity, or a 1x1 conv + BN when the stride or width changes.
  """
  features: int
  strides: int = 1
  bn_axis_name: Optional[str] = None
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = _conv(self, self.features, (3, 3), strides=self.strides, padding=1,
              use_bias=False, kernel_init=_conv_init, name="a_conv")(x)
    y = nn.relu(_batch_norm(train, self.bn_axis_name, "b_bn")(y))
    y = _conv(self, self.features, (3, 3), padding=1, use_bias=False,
              kernel_init=_conv_init, name="c_conv")(y)
    y = _batch_norm(train, self.bn_axis_name, "d_bn")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _ResidualShortcut(self.features, self.strides, self.bn_axis_name,
                            self.conv_backward,
                            name="e_shortcut")(x, train)
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """ResNet-18 in its CIFAR form (He et al. 2016).

  3x3 stride-1 stem conv + BN + ReLU (no max-pool), four stages of two
  :class:`BasicBlock` with widths ``(w, 2w, 4w, 8w)`` and strides
  ``(1, 2, 2, 2)``, global average pooling and a dense classifier. Names:
  ``stage0_stem``, ``stage1_block0 .. stage4_block1``, ``stage5_head``.

  Attributes:
    num_classes: number of output logits.
    width: stem / first-stage width (64 in the paper; tiny in tests).
    bn_axis_name: optional axis name over which BatchNorm averages batch
      statistics (cross-device BatchNorm under ``pmap``/``shard_map``).
  """
  num_classes: int = 10
  width: int = 64
  bn_axis_name: Optional[str] = None
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = _Stem(self.width, self.bn_axis_name, self.conv_backward,
              name="stage0_stem")(x, train)
    for s, strides in enumerate((1, 2, 2, 2)):
      for b in range(2):
        x = BasicBlock(self.width * 2**s, strides if b == 0 else 1,
                       self.bn_axis_name, self.conv_backward,
                       name=f"stage{s + 1}_block{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="stage5_head")(x)


class _Stem(nn.Module):
  features: int
  bn_axis_name: Optional[str] = None
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = _conv(self, self.features, (3, 3), padding=1, use_bias=False,
              kernel_init=_conv_init, name="a_conv")(x)
    return nn.relu(_batch_norm(train, self.bn_axis_name, "b_bn")(x))


class WideBasicBlock(nn.Module):
  """Pre-activation wide residual block (Zagoruyko & Komodakis 2016).

  ``conv(drop(relu(bn(conv(relu(bn(x))))))) + shortcut``; the shortcut is the
  identity, or a 1x1 conv of the pre-activated input when the shape changes.
  """
  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  bn_axis_name: Optional[str] = None
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    h = nn.relu(_batch_norm(train, self.bn_axis_name, "a_bn")(x))
    y = _conv(self, self.features, (3, 3), strides=self.strides, padding=1,
              use_bias=False, kernel_init=_conv_init, name="b_conv")(h)
    y = nn.relu(_batch_norm(train, self.bn_axis_name, "c_bn")(y))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = _conv(self, self.features, (3, 3), padding=1, use_bias=False,
              kernel_init=_conv_init, name="d_conv")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _conv(self, self.features, (1, 1), strides=self.strides,
                use_bias=False, kernel_init=_conv_init, name="e_shortcut")(h)
    return y + x


class WideResNet(nn.Module):
  """Wide ResNet WRN-``depth``-``widen_factor`` (default WRN-16-4).

  A 3x3 stem conv with ``base_width`` channels, three groups of
  ``(depth - 4) / 6`` :class:`WideBasicBlock` with widths
  ``base_width * widen_factor * (1, 2, 4)`` and strides ``(1, 2, 2)``, a final
  BN + ReLU, global average pooling and a dense classifier. Names:
  ``stage0_stem``, ``stage1_block0 ..``, ``stage4_bn``, ``stage5_head``.

  Attributes:
    num_classes: number of output logits.
    depth: total depth, ``6 n + 4`` (16, 22, 28, 40, ...).
    widen_factor: ``k`` in WRN-d-k.
    base_width: 16 in the paper; smaller in tests.
    dropout_rate: dropout between the two convs of a block (needs a
      ``"dropout"`` rng when ``train`` and the rate is positive).
    bn_axis_name: optional axis name for cross-device BatchNorm.
  """
  num_classes: int = 10
  depth: int = 16
  widen_factor: int = 4
  base_width: int = 16
  dropout_rate: float = 0.0
  bn_axis_name: Optional[str] = None
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"WRN depth must be 6n + 4 with n >= 1; got "
                       f"{self.depth}.")
    n = (self.depth - 4) // 6
    x = _conv(self, self.base_width, (3, 3), padding=1, use_bias=False,
              kernel_init=_conv_init, name="stage0_stem")(x)
    for g, strides in enumerate((1, 2, 2)):
      features = self.base_width * self.widen_factor * 2**g
      for b in range(n):
        x = WideBasicBlock(
            features, strides if b == 0 else 1, self.dropout_rate,
            self.bn_axis_name, self.conv_backward,
            name=f"stage{g + 1}_{depth_name('block', b, n)}")(x, train)
    x = nn.relu(_batch_norm(train, self.bn_axis_name, "stage4_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="stage5_head")(x)


class _PatchEmbed(nn.Module):
  """Patchify conv, optional class token, learned position embeddings.

  Named ``a_patch`` (conv), ``b_cls``, ``c_pos`` so that the tree flattens in
  creation order.
  """
  hidden: int
  patch_size: int
  use_cls_token: bool
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1:3]} is not divisible by "
                       f"patch_size={p}.")
    x = _conv(self, self.hidden, (p, p), strides=(p, p), padding="VALID",
              name="a_patch")(x)
    b, h, w, d = x.shape
    x = x.reshape((b, h * w, d))
    init = nn.initializers.normal(stddev=0.02)
    if self.use_cls_token:
      cls = self.param("b_cls", nn.initializers.zeros, (1, 1, d))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    pos = self.param("c_pos", init, (1, x.shape[1], d))
    return x + pos


class ViT(nn.Module):
  """A tiny Vision Transformer (Dosovitskiy et al. 2021).

  Non-overlapping ``patch_size`` patches embedded by a strided conv, a class
  token (``pool="cls"``) or mean pooling (``pool="mean"``), learned position
  embeddings, ``num_layers`` pre-LN :class:`TransformerBlock`, a final
  LayerNorm and a dense head. Names: ``stage0_embed``,
  ``stage1_block0 ..``, ``stage2_ln``, ``stage3_head``. The position
  embedding's length is fixed by the image size seen at ``init``.

  Attributes:
    num_classes: number of output logits.
    patch_size: patch side; must divide the image height and width.
    hidden: token width.
    num_layers: Transformer blocks.
    num_heads: attention heads (must divide ``hidden``).
    mlp_ratio: feed-forward width as a multiple of ``hidden``.
    pool: ``"cls"`` or ``"mean"``.
    dropout_rate: dropout in the blocks (needs a ``"dropout"`` rng when
      ``train`` and the rate is positive).
  """
  num_classes: int = 10
  patch_size: int = 4
  hidden: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 2
  pool: str = "cls"
  dropout_rate: float = 0.0
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls' or 'mean'; got {self.pool!r}.")
    x = _PatchEmbed(self.hidden, self.patch_size, self.pool == "cls",
                    self.conv_backward,
                    name="stage0_embed")(x)
    for i in range(self.num_layers):
      x = TransformerBlock(
          self.num_heads, self.mlp_ratio * self.hidden, causal=False,
          dropout_rate=self.dropout_rate,
          name=f"stage1_{depth_name('block', i, self.num_layers)}")(x, train)
    x = nn.LayerNorm(name="stage2_ln")(x)
    x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, name="stage3_head")(x)
