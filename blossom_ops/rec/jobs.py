"""Run a training or benchmark job in a fresh Python process.

Why a process per job: on CPU the only honest peak-memory figure is the resident set size,
and a process that has already trained one model keeps that memory in its allocator, which
would flatter whichever model runs second. A fresh process per job puts dense and BlossomRec
on equal footing (and isolates thread pools and allocator state for timing too).

The job is a JSON file; the child (``python -m blossom_ops.cli _job FILE``) writes its result
to ``<FILE>.result.json``. The child's output (progress lines) is relayed to our stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict

from .errors import RecError


def run_in_child(job: Dict[str, Any], job_path: str) -> Dict[str, Any]:
    os.makedirs(os.path.dirname(os.path.abspath(job_path)), exist_ok=True)
    with open(job_path, "w") as f:
        json.dump(job, f, indent=2)
    result_path = job_path + ".result.json"
    if os.path.exists(result_path):
        os.remove(result_path)
    # relay the child's output line by line (our stderr may be a Python object, e.g. under
    # pytest, so it cannot be handed to the child as a file descriptor)
    proc = subprocess.Popen([sys.executable, "-m", "blossom_ops.cli", "_job", job_path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())
    for line in proc.stdout:
        sys.stderr.write(line)
        sys.stderr.flush()
    code = proc.wait()
    if code != 0 or not os.path.isfile(result_path):
        raise RecError(f"job {job_path} failed (exit code {code}); see the messages above")
    with open(result_path) as f:
        return json.load(f)


def execute(job_path: str) -> None:
    """Child side: run the job the file describes and write its result next to it."""
    from .config import ModelConfig, TrainConfig, from_dict

    with open(job_path) as f:
        job = json.load(f)
    mcfg = from_dict(ModelConfig, job["model"])
    if job["kind"] == "train":
        from .data import DataSpec, load_sequences
        from .prepare import leave_one_out
        from .train import train_model
        split = leave_one_out(load_sequences(from_dict(DataSpec, job["data"]), quiet=True))
        result = train_model(split, mcfg, from_dict(TrainConfig, job["train"]),
                             out_dir=job.get("out_dir"), resume=job.get("resume", False))
    elif job["kind"] == "bench":
        from .bench import bench_point
        if job.get("threads"):
            import torch
            torch.set_num_threads(job["threads"])
        result = bench_point(mcfg, **job["bench"])
    else:
        raise RecError(f"unknown job kind {job['kind']!r}")
    tmp = job_path + ".result.json.part"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, job_path + ".result.json")
