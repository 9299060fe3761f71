"""Per-epoch checkpoints that let an interrupted run continue exactly where it stopped.

A checkpoint holds everything the next epoch depends on: model and optimizer states, the
epoch counter, the early-stopping state (best score, its epoch, the best weights), the
history of validation metrics, the configs, and every RNG state (python, numpy, torch CPU
and CUDA). Files are written to a temporary name and renamed, so a crash while saving leaves
the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    # weights_only=False: the payload holds RNG states (numpy arrays, tuples) and configs
    return torch.load(path, map_location="cpu", weights_only=False)
