"""PNG plots of a compare report: validation NDCG@10 per epoch, and epoch time and peak memory
against history length. matplotlib is optional (``pip install blossom_ops[plots]``)."""
from __future__ import annotations

import os
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"dense": "tab:blue", "blossom": "tab:red"}


def plot_valid_curves(rep: Dict[str, Any], path: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for run in rep["runs"]:
        epochs = [h["epoch"] for h in run["history"]]
        ndcg = [h["valid"]["NDCG@10"] for h in run["history"]]
        label = run["attention"] if run["attention"] not in seen else None
        seen.add(run["attention"])
        ax.plot(epochs, ndcg, color=COLORS.get(run["attention"]), alpha=0.8, label=label,
                marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10 (full ranking)")
    ax.set_title("validation NDCG@10 per epoch (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_vs_length(rep: Dict[str, Any], key: str, ylabel: str, path: str,
                   scale: float = 1.0) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for att in ("dense", "blossom"):
        pts = sorted((p for p in rep["bench"]["points"] if p["attention"] == att),
                     key=lambda p: p["max_len"])
        if pts:
            ax.plot([p["max_len"] for p in pts], [p[key] / scale for p in pts], marker="o",
                    color=COLORS[att], label=att)
    ax.set_xscale("log")
    ax.set_xlabel("history length (max_len)")
    ax.set_ylabel(ylabel)
    dev = rep["machine"].get("gpu") or rep["machine"].get("cpu", "")
    ax.set_title(f"one training epoch, synthetic histories\n{dev}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(rep: Dict[str, Any], out_dir: str) -> List[str]:
    paths = []
    if rep["runs"]:
        paths.append(plot_valid_curves(rep, os.path.join(out_dir, "valid_ndcg.png")))
    if rep["bench"]["points"]:
        paths.append(plot_vs_length(rep, "time_per_epoch_s", "seconds per epoch",
                                    os.path.join(out_dir, "time_vs_length.png")))
        paths.append(plot_vs_length(rep, "peak_memory_bytes", "peak memory (MiB)",
                                    os.path.join(out_dir, "memory_vs_length.png"), 2 ** 20))
    return paths
