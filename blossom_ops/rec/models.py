"""SASRec and BERT4Rec with dense or BlossomRec attention through the same layer.

Both are pre-LayerNorm Transformer encoders over right-padded item sequences
(ids 1..N, 0 = padding), with the output scored against the tied item embeddings.
Sequences are right-padded so that position 0 is the oldest item: block boundaries of the
sparse pattern and learned or rotary positions then count from the start of the history.

``forward(batch)`` returns the summed loss and the number of predicted positions: the caller
divides by the global count, which keeps gradients exact under data parallelism (every
process normalises by the same number, whatever its share of the targets).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

from ..nn import BlossomAttention


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = BlossomAttention(
            cfg.hidden, cfg.heads, num_kv_heads=cfg.kv_heads, causal=causal,
            pattern=cfg.attention, block_len=cfg.block_len, stride=cfg.stride,
            block_size=cfg.block_size, top_n=cfg.top_n, window=cfg.window, dilated=cfg.dilated,
            compressor=cfg.compressor, compressed_branch=cfg.compressed_branch,
            rope=cfg.positions == "rope", dropout=cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, 4 * cfg.hidden), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(4 * cfg.hidden, cfg.hidden),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), lengths=lengths)
        return x + self.ffn(self.ln2(x))


class SequentialRecommender(nn.Module):
    """Shared encoder; subclasses say whether attention is causal and how inputs look."""
    causal = True
    extra_tokens = 0  # ids after num_items reserved for special tokens (BERT4Rec's [MASK])

    def __init__(self, num_items: int, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        self.item_emb = nn.Embedding(num_items + 1 + self.extra_tokens, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, self.causal) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.hidden)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def encode(self, items: Tensor, lengths: Tensor) -> Tensor:
        """items int64 [B, L] (right-padded), lengths [B] -> hidden [B, L, hidden]."""
        L = items.shape[1]
        x = self.item_emb(items)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:L][None]
        valid = (torch.arange(L, device=items.device)[None] < lengths[:, None])
        x = self.drop(x) * valid[..., None]
        for block in self.blocks:
            x = block(x, lengths)
        return self.ln(x)

    def item_logits(self, h: Tensor) -> Tensor:
        """h [..., hidden] -> scores [..., num_items + 1] (column 0, padding, is -inf)."""
        logits = h @ self.item_emb.weight[: self.num_items + 1].t()
        logits[..., 0] = float("-inf")
        return logits

    def forward(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """Summed loss over the positions with a target (target > 0), and their count."""
        h = self.encode(batch["items"], batch["lengths"])
        pick = batch["target"] > 0
        h, target = h[pick], batch["target"][pick]
        count = pick.sum()
        if self.cfg.loss == "ce":
            logits = self.item_logits(h).float()
            return F.cross_entropy(logits, target, reduction="sum"), count
        # sampled softmax: K uniform negatives shared by the batch; a negative equal to the
        # target is masked so it never counts against it
        neg = torch.randint(1, self.num_items + 1, (self.cfg.num_negatives,), device=h.device)
        pos_score = (h * self.item_emb(target)).sum(-1, keepdim=True)
        neg_score = (h @ self.item_emb(neg).t()).masked_fill(target[:, None] == neg[None],
                                                             float("-inf"))
        logits = torch.cat([pos_score, neg_score], dim=1).float()
        zero = torch.zeros(len(target), dtype=torch.long, device=h.device)
        return F.cross_entropy(logits, zero, reduction="sum"), count

    # --- inference -----------------------------------------------------------------
    def eval_input(self, history):
        """The input sequence (a list of ids) that predicts the item after ``history``."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, items: Tensor, lengths: Tensor) -> Tensor:
        """Scores [B, num_items + 1] of the next item, read at the last valid position."""
        h = self.encode(items, lengths)
        last = h[torch.arange(len(items), device=items.device), lengths - 1]
        return self.item_logits(last).float()


class SASRec(SequentialRecommender):
    """Causal self-attention; every position predicts the next item (Kang & McAuley 2018)."""
    causal = True

    def eval_input(self, history):
        return list(history[-self.cfg.max_len:])


class BERT4Rec(SequentialRecommender):
    """Bidirectional self-attention trained by cloze masking (Sun et al. 2019); the next item
    is predicted at a [MASK] appended to the history."""
    causal = False
    extra_tokens = 1

    @property
    def mask_id(self) -> int:
        return self.num_items + 1

    def eval_input(self, history):
        return list(history[-(self.cfg.max_len - 1):]) + [self.mask_id]


def build_model(num_items: int, cfg: ModelConfig) -> SequentialRecommender:
    cfg.check()
    return {"sasrec": SASRec, "bert4rec": BERT4Rec}[cfg.model](num_items, cfg)
