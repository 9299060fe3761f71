"""Smoke tests of the ``blossom-rec`` command on a tiny synthetic dataset (no network)."""
import json
import os

import numpy as np
import pytest

from blossom_ops.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--min-user", "1", "--min-item", "1", "--max-len", "12", "--hidden", "16",
        "--layers", "1", "--heads", "2", "--block-len", "8", "--stride", "4", "--block-size", "4",
        "--top-n", "1", "--window", "2", "--batch-size", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOSSOM_OPS_CACHE", str(tmp_path / "cache"))
    # child processes (compare) must import this checkout
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = np.random.default_rng(0)
    path = tmp_path / "seq.txt"
    with open(path, "w") as f:
        for u in range(16):
            start = rng.integers(0, 30)
            for k in range(rng.integers(6, 20)):
                f.write(f"user{u} {(start + k) % 30}\n")
    return str(path)


def test_data_describes_the_dataset(dataset, capsys):
    assert main(["data", "--data", dataset, "--min-user", "1", "--min-item", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["users"] == 16 and d["items"] == 30
    assert d["length_min"] >= 6 and d["length_max"] <= 19


def test_train_writes_results_and_resumes(dataset, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", dataset, *TINY, "--epochs", "2", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "test (full ranking)" in text and "NDCG@10" in text
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["epochs_run"] == 2 and set(os.listdir(out)) >= {"last.pt", "best.pt"}
    # resuming a finished 2-epoch run with a budget of 3 trains exactly one more epoch
    assert main(["train", "--data", dataset, *TINY, "--epochs", "3", "--out", out,
                 "--resume"]) == 0
    res = json.load(open(os.path.join(out, "result.json")))
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]


def test_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["data", "--data", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blossom-rec: error:") and "Traceback" not in err
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--hidden", "30",
                 "--heads", "4"]) == 2
    assert "multiple of --heads" in capsys.readouterr().err


def test_compare_writes_table_json_and_plots(dataset, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert main(["compare", "--data", dataset, *TINY, "--epochs", "2", "--out", out,
                 "--bench-lens", "8,16", "--bench-seqs", "4", "--bench-batch", "2",
                 "--bench-items", "50"]) == 0
    text = capsys.readouterr().out
    assert "| NDCG@10 |" in text and "| time / epoch |" in text and "| max_len |" in text
    rep = json.load(open(os.path.join(out, "report.json")))
    assert set(rep["summary"]) == {"dense", "blossom"}
    assert [r["max_len"] for r in rep["bench"]["rows"]] == [8, 16]
    for r in rep["runs"]:
        assert r["peak_memory_bytes"] >= 0 and r["time_per_epoch_s"] > 0
    for png in ("valid_ndcg.png", "time_vs_length.png", "memory_vs_length.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
