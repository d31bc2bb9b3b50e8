"""A decoder-only character-level Transformer language model in Flax Linen.

:class:`CharTransformerLM` maps integer tokens ``(B, T)`` to next-token
logits ``(B, T, vocab_size)``: token + learned position embeddings, a stack of
pre-LN causal self-attention blocks, a final LayerNorm and an output head that
is either the transposed token embedding (``tie_embeddings=True``) or its own
dense layer. Position ``t`` of the output depends on tokens ``0..t`` only.

Parameter names sort in depth order (see :mod:`optax_sam.models.layers`):
``stage0_embed`` (``a_tok``, ``b_pos``), ``stage1_block0 ..``, ``stage2_ln``
and, when untied, ``stage3_head``. With tied embeddings the token embedding
serves both as the first and the last layer; it is grouped with the input
side.

References:
  Vaswani, A. et al. (2017). Attention is all you need. NeurIPS.
  Radford, A. et al. (2019). Language models are unsupervised multitask
  learners. OpenAI report (decoder-only, pre-LN, tied embeddings).
  Press, O. and Wolf, L. (2017). Using the output embedding to improve
  language models. EACL (weight tying).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_sam.models.layers import TransformerBlock
from optax_sam.models.layers import depth_name

Array = jax.Array


class _TokenPositionEmbed(nn.Module):
  """Token embedding ``a_tok`` plus learned position embedding ``b_pos``."""
  vocab_size: int
  max_len: int
  d_model: int

  def setup(self) -> None:
    init = nn.initializers.normal(stddev=0.02)
    self.a_tok = nn.Embed(self.vocab_size, self.d_model, embedding_init=init)
    self.b_pos = nn.Embed(self.max_len, self.d_model, embedding_init=init)

  def __call__(self, tokens: Array) -> Array:
    t = tokens.shape[-1]
    return self.a_tok(tokens) + self.b_pos(jnp.arange(t))[None]

  def attend(self, x: Array) -> Array:
    """Logits ``x @ tok.T`` for a tied output head."""
    return self.a_tok.attend(x)


class CharTransformerLM(nn.Module):
  """Decoder-only character-level Transformer LM (GPT-style, pre-LN).

  Attributes:
    vocab_size: number of distinct tokens (characters).
    d_model: width of the residual stream.
    num_layers: number of Transformer blocks.
    num_heads: attention heads (must divide ``d_model``).
    max_len: longest sequence the position embedding covers.
    mlp_ratio: feed-forward width as a multiple of ``d_model``.
    dropout_rate: dropout in the blocks and on the embeddings (needs a
      ``"dropout"`` rng when ``train`` and the rate is positive).
    tie_embeddings: use the token embedding as the output projection.
  """
  vocab_size: int
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 256
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  tie_embeddings: bool = True

  @nn.compact
  def __call__(self, tokens: Array, train: bool = False) -> Array:
    """Next-token logits.

    Args:
      tokens: integer array ``(B, T)`` with ``T <= max_len``.
      train: enables dropout.

    Returns:
      Logits ``(B, T, vocab_size)``; position ``t`` sees ``tokens[:, :t+1]``.
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (batch, time); got {tokens.shape}.")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds "
                       f"max_len={self.max_len}.")
    embed = _TokenPositionEmbed(self.vocab_size, self.max_len, self.d_model,
                                name="stage0_embed")
    x = embed(tokens)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i in range(self.num_layers):
      x = TransformerBlock(
          self.num_heads, self.mlp_ratio * self.d_model, causal=True,
          dropout_rate=self.dropout_rate,
          name=f"stage1_{depth_name('block', i, self.num_layers)}")(x, train)
    x = nn.LayerNorm(name="stage2_ln")(x)
    if self.tie_embeddings:
      return embed.attend(x)
    return nn.Dense(self.vocab_size, name="stage3_head")(x)
