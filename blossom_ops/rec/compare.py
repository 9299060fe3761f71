"""The main job: dense vs BlossomRec attention, same model, same split, same budget.

For every seed, both attentions train with identical settings (each in its own process, see
jobs.py); then a sweep over history lengths times one epoch of each on synthetic histories.
Everything lands in ``out_dir``: runs/<attention>-seed<k>/ (checkpoints, result.json),
report.json, report.md and the PNG plots.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from typing import Any, Dict, List, Sequence

from .config import ATTENTIONS, ModelConfig, TrainConfig, to_dict
from .data import DataSpec
from .jobs import run_in_child
from .report import markdown_report, summarize


def compare(spec: DataSpec, mcfg: ModelConfig, tcfg: TrainConfig, *, out_dir: str,
            seeds: int = 1, bench_lens: Sequence[int] = (50, 200, 1000),
            bench_seqs: int = 32, bench_batch: int = 16, bench_items: int = 2000,
            plots: bool = True, resume: bool = False) -> Dict[str, Any]:
    os.makedirs(out_dir, exist_ok=True)
    runs: List[Dict[str, Any]] = []
    for seed in range(tcfg.seed, tcfg.seed + seeds):
        for attention in ATTENTIONS:
            name = f"{attention}-seed{seed}"
            print(f"== {name}: {mcfg.model}, max_len {mcfg.max_len}", file=sys.stderr, flush=True)
            run_dir = os.path.join(out_dir, "runs", name)
            job = {"kind": "train", "data": to_dict(spec),
                   "model": to_dict(replace(mcfg, attention=attention)),
                   "train": to_dict(replace(tcfg, seed=seed)), "out_dir": run_dir,
                   "resume": resume}
            result = run_in_child(job, os.path.join(run_dir, "job.json"))
            result["name"], result["seed"], result["attention"] = name, seed, attention
            runs.append(result)
    bench: List[Dict[str, Any]] = []
    for length in bench_lens:
        for attention in ATTENTIONS:
            print(f"== bench-len {attention} L={length}", file=sys.stderr, flush=True)
            job = {"kind": "bench", "model": to_dict(replace(mcfg, attention=attention)),
                   "threads": tcfg.threads,
                   "bench": {"max_len": int(length), "num_seqs": bench_seqs,
                             "batch_size": bench_batch, "num_items": bench_items,
                             "device": tcfg.device, "amp": tcfg.amp}}
            bench.append(run_in_child(job, os.path.join(out_dir, "bench",
                                                        f"{attention}-L{length}.json")))
    report = summarize(runs, bench, spec=to_dict(spec), model=to_dict(mcfg), train=to_dict(tcfg))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = markdown_report(report)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    if plots:
        try:
            from .plots import plot_all
            report["plots"] = plot_all(report, out_dir)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)",
                  file=sys.stderr)
    return report
