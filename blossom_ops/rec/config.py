"""Model and training settings, with defaults sized for MovieLens-100k on a laptop CPU.

The sparse-pattern defaults are the BlossomRec paper's (DESIGN.md): compression block 32 with
stride 16, selection block 16, top-4 blocks, window 8 widened by power-of-two offsets.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

MODELS = ("sasrec", "bert4rec")
ATTENTIONS = ("dense", "blossom")
POSITIONS = ("learned", "rope")
LOSSES = ("ce", "sampled")


@dataclass
class ModelConfig:
    model: str = "sasrec"
    attention: str = "blossom"
    max_len: int = 50
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: Optional[int] = None
    dropout: float = 0.2
    positions: str = "learned"
    # BlossomRec pattern (ignored by dense attention)
    block_len: int = 32
    stride: int = 16
    block_size: int = 16
    top_n: int = 4
    window: int = 8
    dilated: bool = True
    compressed_branch: bool = False
    compressor: str = "mean"
    # objective
    loss: str = "ce"               # "ce": softmax over all items; "sampled": sampled softmax
    num_negatives: int = 256       # negatives per batch for the sampled softmax
    mask_prob: float = 0.2         # BERT4Rec cloze masking rate

    def check(self) -> "ModelConfig":
        from .errors import RecError
        for name, value, allowed in (("model", self.model, MODELS),
                                     ("attention", self.attention, ATTENTIONS),
                                     ("positions", self.positions, POSITIONS),
                                     ("loss", self.loss, LOSSES)):
            if value not in allowed:
                raise RecError(f"--{name.replace('_', '-')} must be one of {allowed}, got {value!r}")
        if self.hidden % self.heads:
            raise RecError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads})")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise RecError(f"--heads ({self.heads}) must be a multiple of --kv-heads "
                           f"({self.kv_heads})")
        if self.max_len < 2:
            raise RecError("--max-len must be at least 2")
        if not 0.0 < self.mask_prob < 1.0:
            raise RecError("--mask-prob must lie in (0, 1)")
        return self


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128           # global batch (split across DDP processes)
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 5               # epochs without a better valid NDCG@10 before stopping
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 256
    exclude_seen: bool = False      # drop already-seen items from the ranking
    sampled_eval: bool = False      # also report the 100-negative sampled protocol
    amp: bool = True                # bf16 autocast on CUDA (never on CPU)
    progress: bool = True           # tqdm bars
    threads: int = 0                # torch.set_num_threads; 0 leaves the default


def to_dict(cfg) -> Dict[str, Any]:
    return asdict(cfg)


def from_dict(cls, d: Dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
