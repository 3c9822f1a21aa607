"""Sentence-embedding wrapper for BERT-style encoders, so a Hugging Face model exports and evaluates as one graph.

all-MiniLM-L6-v2 (sentence-transformers) embeds a sentence as the attention-masked mean of the last hidden
states, L2-normalised; wrapping that pooling into the module puts it inside the exported ONNX graph, so the
device runs exactly what the server measured.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["MeanPooledEncoder", "cosine_similarity_rows"]


class MeanPooledEncoder(nn.Module):
    """``(input_ids, attention_mask) -> (B, H)`` unit-norm sentence embeddings from a BERT-style encoder."""

    def __init__(self, encoder: nn.Module, *, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def cosine_similarity_rows(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (embedding fidelity after compression)."""
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return nn.functional.cosine_similarity(a, b, dim=-1).numpy()
