"""What a block computed, handed lazily to the scorers: nothing is computed unless a scorer asks for it."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ScoreContext"]


class ScoreContext:
    """Per-block inputs of the scorers and reducers.

    Args:
        q: queries ``[B, H, T, d]`` after qk-norm.
        k: keys ``[B, H, T, d]`` after qk-norm.
        scale: attention logit scale (``d ** -0.5``).
        num_prefix: prefix tokens (class, distillation, registers) at the front of the sequence.
        bias: additive attention-logit bias ``[B, 1, 1, T]`` (proportional attention) or None.
        attention: attention probabilities ``[B, H, T, T]`` when the block materialised them, else None.
        layer: block index.
        seed: routing seed (``random`` scorer).
        v: values ``[B, H, T, d]`` (scorers weighting attention by value norms).
    """

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        scale: float,
        num_prefix: int,
        bias: Tensor | None = None,
        attention: Tensor | None = None,
        layer: int = 0,
        seed: int = 0,
        v: Tensor | None = None,
    ) -> None:
        self.q, self.k, self.v, self.scale = q, k, v, scale
        self.num_prefix, self.bias, self.layer, self.seed = num_prefix, bias, layer, seed
        self._attention = attention
        self._cls_attention: Tensor | None = None

    @property
    def attention(self) -> Tensor:
        """Full attention probabilities ``[B, H, T, T]``; only scorers registered with ``needs_attention`` get it."""
        if self._attention is None:
            raise RuntimeError(
                "attention probabilities were not materialised; register the scorer with needs_attention=True"
            )
        return self._attention

    @property
    def cls_attention(self) -> Tensor:
        """Attention of the class token to every token, per head ``[B, H, T]``.

        Computed from the class query and the keys in O(T d) per head, never from the T x T matrix.
        """
        # Cached by hand: functools.cached_property takes a lock that torch.compile cannot trace on Python 3.11.
        if self._cls_attention is None:
            if self._attention is not None:
                self._cls_attention = self._attention[:, :, 0]
            else:
                logits = (self.q[:, :, :1] * self.scale) @ self.k.transpose(-2, -1)
                if self.bias is not None:
                    logits = logits + self.bias
                self._cls_attention = logits.softmax(dim=-1).squeeze(2)
        return self._cls_attention

    @property
    def key_metric(self) -> Tensor:
        """Keys averaged over heads ``[B, T, d]``: ToMe's similarity metric for merging."""
        return self.k.mean(dim=1)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from the routing seed and the layer, the same on every run."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.layer)
