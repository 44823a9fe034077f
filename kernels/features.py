"""`TileFeatures`: everything a backend needs about one attention tile besides q, k, v.

`api.partial_attention` validates its arguments once and builds one `TileFeatures`; every
backend's `partial_attention(q, k, v, features)` takes it, so the masking features are
spelled in one place instead of in each backend's signature. Backends may assume it is
well formed (shapes, dtypes and devices as below), except where they also serve direct
callers (the triton launcher checks again: `triton_backend.py`).

The visibility rule itself is defined by `reference.visibility` (the oracle);
`TileFeatures.visibility` only applies it to these features.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Optional

from torch import Tensor

from fxdisagg.kernels.reference import alibi_bias, visibility


@dataclass(frozen=True, eq=False)  # eq by identity: `==` on tensor fields is elementwise
class TileFeatures:
    """Positions, masking features and softmax scale of one (query shard, key shard) tile.

    Per-token tensors are `[M]` (shared by the batch) or `[B, M]`, on q's device. None or
    False means the feature masks nothing. A backend that drops features which mask
    nothing in its tile makes a new object (`dataclasses.replace`); this one is frozen.
    """

    q_pos: Tensor  # int64 [Mq] | [B, Mq]: explicit token positions, any order
    k_pos: Tensor  # int64 [Mk] | [B, Mk]
    _: KW_ONLY
    scale: float  # softmax scale (api default 1/sqrt(D))
    causal: bool = True  # k_pos <= q_pos
    window: Optional[int] = None  # q_pos - k_pos < window
    window_ahead: Optional[int] = None  # k_pos - q_pos < window_ahead
    softcap: Optional[float] = None  # scores s become softcap * tanh(s / softcap) (Gemma 2)
    alibi: Optional[Tensor] = None  # fp32 [Hq] slopes: scores += alibi[h] * (k_pos - q_pos)
    q_doc: Optional[Tensor] = None  # int64, as q_pos; given with k_doc: q_doc == k_doc
    k_doc: Optional[Tensor] = None  # int64, as k_pos
    k_valid: Optional[Tensor] = None  # bool, as k_pos; False = padding key

    def only_causal(self) -> bool:
        """No window, document or padding feature (causal may or may not be on)."""
        return (self.window is None and self.window_ahead is None and self.q_doc is None
                and self.k_valid is None)

    def only_padding(self) -> bool:
        """Key validity is the only feature that masks: visibility depends on the key alone."""
        return (self.k_valid is not None and not self.causal and self.window is None
                and self.window_ahead is None and self.q_doc is None)

    def masks_nothing(self) -> bool:
        """Every key is visible to every query."""
        return not self.causal and self.only_causal()

    def bends_scores(self) -> bool:
        """Soft-capping or ALiBi changes the scores themselves (not only which are seen)."""
        return self.softcap is not None or self.alibi is not None

    def bias(self) -> Optional[Tensor]:
        """The ALiBi term `[B|1, Hq, Mq, Mk]` fp32 (`reference.alibi_bias`), None without it."""
        return None if self.alibi is None else alibi_bias(self.q_pos, self.k_pos, self.alibi)

    def visibility(self) -> Tensor:
        """bool `[B|1, Mq, Mk]` by `reference.visibility`."""
        return visibility(
            self.q_pos, self.k_pos, self.causal, self.window, self.q_doc, self.k_doc,
            self.k_valid, self.window_ahead,
        )
