"""Example Flax (Linen) models for ``optax_sam``; needs ``flax``.

Not imported by ``optax_sam`` itself: ``import optax_sam.models`` explicitly.

Models (all take ``train: bool`` in ``__call__``):

* :class:`MLP`, :class:`SmallCNN` (6 conv + 2 dense), :class:`ResNet18`
  (CIFAR form, BatchNorm), :class:`WideResNet` (WRN-d-k, BatchNorm),
  :class:`ViT` (image classifiers, ``(B, H, W, C) -> (B, num_classes)``);
* :class:`CharTransformerLM` (``(B, T)`` tokens ``-> (B, T, vocab)`` logits).

Submodules are named so that the parameter tree flattens input side first,
hence ``optax_sam.layer_groups(params)`` lists layers by depth.

:data:`MODELS` maps a short name to a constructor with that name's defaults;
:func:`get_model` builds one, keyword arguments overriding the defaults::

  model = get_model("resnet18", num_classes=10, width=16)
  variables = model.init(key, x[:1])
  loss_fn, has_aux = make_loss_fn(model, variables)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from optax_sam.models.layers import MlpBlock
from optax_sam.models.layers import SelfAttention
from optax_sam.models.layers import TransformerBlock
from optax_sam.models.layers import depth_name
from optax_sam.models.lm import CharTransformerLM
from optax_sam.models.losses import accuracy
from optax_sam.models.losses import batchnorm_classifier_loss
from optax_sam.models.losses import classifier_loss
from optax_sam.models.losses import cross_entropy
from optax_sam.models.losses import eval_metrics
from optax_sam.models.losses import lm_loss
from optax_sam.models.losses import make_loss_fn
from optax_sam.models.losses import next_token_loss
from optax_sam.models.vision import BasicBlock
from optax_sam.models.vision import MLP
from optax_sam.models.vision import ResNet18
from optax_sam.models.vision import SmallCNN
from optax_sam.models.vision import ViT
from optax_sam.models.vision import WideBasicBlock
from optax_sam.models.vision import WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet18": ResNet18,
    "wrn16_4": functools.partial(WideResNet, depth=16, widen_factor=4),
    "wrn28_10": functools.partial(WideResNet, depth=28, widen_factor=10),
    "vit_tiny": functools.partial(ViT, patch_size=4, hidden=64, num_layers=4,
                                  num_heads=4),
    "char_lm": CharTransformerLM,
}
"""Model name -> constructor (keyword arguments override its defaults).

``char_lm`` needs ``vocab_size``."""

# Names of the models that keep a ``batch_stats`` collection.
BATCHNORM_MODELS = frozenset({"resnet18", "wrn16_4", "wrn28_10"})


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the model registered as ``name`` in :data:`MODELS`.

  Args:
    name: one of ``MODELS`` (``"mlp"``, ``"cnn"``, ``"resnet18"``,
      ``"wrn16_4"``, ``"wrn28_10"``, ``"vit_tiny"``, ``"char_lm"``).
    **kwargs: module attributes overriding the registered defaults, e.g.
      ``num_classes``, ``width``; ``char_lm`` needs ``vocab_size``.

  Returns:
    An unbound Flax module.

  Raises:
    ValueError: for an unknown name.
    TypeError: for an attribute the model does not have.
  """
  try:
    ctor = MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known models are "
                     f"{sorted(MODELS)}.") from None
  return ctor(**kwargs)


__all__ = [
    "BATCHNORM_MODELS", "BasicBlock", "CharTransformerLM", "MLP", "MODELS",
    "MlpBlock", "ResNet18", "SelfAttention", "SmallCNN", "TransformerBlock",
    "ViT", "WideBasicBlock", "WideResNet", "accuracy",
    "batchnorm_classifier_loss", "classifier_loss", "cross_entropy",
    "depth_name", "eval_metrics", "get_model", "lm_loss", "make_loss_fn",
    "next_token_loss",
]
