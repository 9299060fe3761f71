"""Turn the per-run results of ``compare`` into one summary (JSON) and a markdown table.

Accuracy numbers are test-set full-ranking metrics of the weights with the best validation
NDCG@10, as mean ± sample standard deviation over seeds (the run-to-run spread), with the
min..max range. Ratios are BlossomRec / dense (below 1 means BlossomRec is faster or smaller).
"""
from __future__ import annotations

import datetime
import statistics
from typing import Any, Dict, List, Sequence

TABLE_METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")
COST_METRICS = ("time_per_epoch_s", "peak_memory_bytes")


def _stats(values: Sequence[float]) -> Dict[str, float]:
    vals = list(values)
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(runs: List[Dict[str, Any]], bench: List[Dict[str, Any]], **settings) -> Dict[str, Any]:
    by_att: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by_att.setdefault(r["attention"], []).append(r)
    summary = {}
    for att, rs in by_att.items():
        s = {m: _stats([r["test"][m] for r in rs]) for m in TABLE_METRICS}
        s.update({m: _stats([r[m] for r in rs]) for m in COST_METRICS})
        s["valid_NDCG@10"] = _stats([r["valid"]["NDCG@10"] for r in rs])
        sampled = [k for k in rs[0]["test"] if k.startswith("sampled100/")]
        s.update({k: _stats([r["test"][k] for r in rs]) for k in sampled})
        s["best_epoch"] = [r["best_epoch"] for r in rs]
        s["epochs_run"] = [r["epochs_run"] for r in rs]
        summary[att] = s
    ratios = {}
    if "dense" in summary and "blossom" in summary:
        d, b = summary["dense"], summary["blossom"]
        ratios = {m: _ratio(b[m]["mean"], d[m]["mean"]) for m in d if isinstance(d[m], dict)}
    verdict = {}
    if ratios:
        d, b = summary["dense"]["NDCG@10"], summary["blossom"]["NDCG@10"]
        verdict = {"dense_NDCG@10": d["mean"], "dense_std": d["std"],
                   "blossom_NDCG@10": b["mean"], "blossom_std": b["std"],
                   "difference": b["mean"] - d["mean"],
                   # "within the spread": no worse than one dense standard deviation below
                   "within_dense_spread_or_better": b["mean"] >= d["mean"] - d["std"]}
    bench_rows = []
    lengths = sorted({p["max_len"] for p in bench})
    for L in lengths:
        pts = {p["attention"]: p for p in bench if p["max_len"] == L}
        row = {"max_len": L}
        for att, p in pts.items():
            row[f"{att}_time_s"] = p["time_per_epoch_s"]
            row[f"{att}_memory_bytes"] = p["peak_memory_bytes"]
        if "dense" in pts and "blossom" in pts:
            row["time_ratio"] = _ratio(pts["blossom"]["time_per_epoch_s"],
                                       pts["dense"]["time_per_epoch_s"])
            row["memory_ratio"] = _ratio(pts["blossom"]["peak_memory_bytes"],
                                         pts["dense"]["peak_memory_bytes"])
        bench_rows.append(row)
    compact_runs = [{k: r[k] for k in ("name", "attention", "seed", "best_epoch", "epochs_run",
                                       "valid", "test", "time_per_epoch_s", "peak_memory_bytes",
                                       "params", "history")} for r in runs]
    machine = runs[0]["machine"] if runs else (bench[0]["machine"] if bench else {})
    return {"created": datetime.datetime.now().isoformat(timespec="seconds"),
            "settings": settings, "machine": machine,
            "memory_kind": runs[0]["memory_kind"] if runs else "",
            "data": runs[0]["data"] if runs else {},
            "summary": summary, "ratios": ratios, "verdict": verdict,
            "bench": {"points": bench, "rows": bench_rows,
                      "settings": {k: bench[0][k] for k in ("num_seqs", "batch_size", "num_items")}
                      if bench else {}},
            "runs": compact_runs}


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:.1f} MiB"


def _pm(s: Dict[str, float], fmt: str = "{:.4f}") -> str:
    if s["n"] > 1:
        return f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}"
    return fmt.format(s["mean"])


def markdown_report(rep: Dict[str, Any]) -> str:
    m = rep["machine"]
    st = rep["settings"]
    mc, tc = st.get("model", {}), st.get("train", {})
    lines = [f"# dense vs BlossomRec attention — {mc.get('model', '?')} on "
             f"{st.get('spec', {}).get('data', '?')}", "",
             f"Machine: {m.get('gpu') or m.get('cpu', '?')} ({m.get('device', '?')}, "
             f"{m.get('cpu_threads', '?')} threads), torch {m.get('torch', '?')}; "
             f"{rep['created']}.", "",
             f"Data: {rep['data'].get('users')} users, {rep['data'].get('items')} items, "
             f"{rep['data'].get('train_samples')} training windows. Model: hidden "
             f"{mc.get('hidden')}, {mc.get('layers')} layers, {mc.get('heads')} heads, max_len "
             f"{mc.get('max_len')}, {mc.get('positions')} positions; blossom pattern block_len "
             f"{mc.get('block_len')}/stride {mc.get('stride')}, block {mc.get('block_size')}, "
             f"top-{mc.get('top_n')}, window {mc.get('window')}"
             f"{' dilated' if mc.get('dilated') else ''}. Training: up to {tc.get('epochs')} "
             f"epochs, patience {tc.get('patience')}, batch {tc.get('batch_size')}, lr "
             f"{tc.get('lr')}.", "",
             "Test metrics, full ranking over all items (best-validation weights); mean ± std "
             "over seeds when there are several. Ratio = blossom / dense.", "",
             "| metric | dense | blossom | ratio |", "|---|---|---|---|"]
    s, r = rep["summary"], rep["ratios"]
    atts = [a for a in ("dense", "blossom") if a in s]
    for metric in TABLE_METRICS:
        cells = [_pm(s[a][metric]) for a in atts]
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {r.get(metric, float('nan')):.3f} |")
    lines.append("| time / epoch | " + " | ".join(_pm(s[a]["time_per_epoch_s"], "{:.2f}") + " s"
                                                  for a in atts)
                 + f" | {r.get('time_per_epoch_s', float('nan')):.3f} |")
    lines.append("| peak memory | " + " | ".join(_mib(s[a]["peak_memory_bytes"]["mean"])
                                                 for a in atts)
                 + f" | {r.get('peak_memory_bytes', float('nan')):.3f} |")
    sampled = [k for k in s[atts[0]] if k.startswith("sampled100/")] if atts else []
    if sampled:
        lines += ["", "Sampled protocol (target vs 100 uniform unseen negatives; NOT comparable "
                  "with full ranking):", "", "| metric | dense | blossom |", "|---|---|---|"]
        for k in sampled:
            if k.split("/")[1] in TABLE_METRICS:
                lines.append(f"| {k} | " + " | ".join(_pm(s[a][k]) for a in atts) + " |")
    if rep["verdict"]:
        v = rep["verdict"]
        n = s["dense"]["NDCG@10"]["n"]
        head = (f"NDCG@10: blossom {v['blossom_NDCG@10']:.4f} vs dense "
                f"{v['dense_NDCG@10']:.4f} (difference {v['difference']:+.4f}")
        if n > 1:
            head += (f"; dense spread ± {v['dense_std']:.4f} over {n} seeds): "
                     + ("within the dense run-to-run spread or better."
                        if v["within_dense_spread_or_better"] else "below the dense spread."))
        else:  # one seed has no spread: say so instead of printing ± 0
            head += ("; one seed, so no run-to-run spread to compare against: "
                     "run with --seeds 3 for one).")
        lines += ["", head]
    lines += ["", "Per run: " + "; ".join(
        f"{x['name']}: best epoch {x['best_epoch']}/{x['epochs_run']}, test NDCG@10 "
        f"{x['test']['NDCG@10']:.4f}" for x in rep["runs"])]
    rows = rep["bench"]["rows"]
    if rows:
        bs = rep["bench"]["settings"]
        lines += ["", f"Training epoch vs history length (synthetic: {bs.get('num_seqs')} "
                  f"histories of max_len items, batch {bs.get('batch_size')}, "
                  f"{bs.get('num_items')} items; memory: {rep.get('memory_kind', '')}):", "",
                  "| max_len | dense time | blossom time | time ratio | dense memory | "
                  "blossom memory | memory ratio |", "|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['max_len']} | {row.get('dense_time_s', float('nan')):.2f} s | "
                         f"{row.get('blossom_time_s', float('nan')):.2f} s | "
                         f"{row.get('time_ratio', float('nan')):.2f} | "
                         f"{_mib(row.get('dense_memory_bytes', 0))} | "
                         f"{_mib(row.get('blossom_memory_bytes', 0))} | "
                         f"{row.get('memory_ratio', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"
