"""``blossom-rec``: train and evaluate sequential recommenders with dense vs BlossomRec attention.

    blossom-rec data                       # fetch and describe MovieLens-100k
    blossom-rec train --attention blossom  # one model; --out DIR keeps checkpoints, --resume
    blossom-rec compare                    # the main job: dense vs blossom, table, JSON, plots
    blossom-rec bench-len --lens 50,200,1000   # epoch time and memory vs history length

Multi-process training: ``torchrun --nproc-per-node 2 -m blossom_ops.cli train ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .rec.config import ATTENTIONS, LOSSES, MODELS, POSITIONS, ModelConfig, TrainConfig
from .rec.errors import RecError

M, T = ModelConfig(), TrainConfig()


def _ints(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _bool_flag(p, name: str, default: bool, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                   default=default, help=help)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="ml-100k",
                   help="built-in dataset name (ml-100k) or a file path (default: ml-100k)")
    g.add_argument("--format", default="auto",
                   choices=["auto", "inter", "udata", "dat", "mlcsv", "pairs", "csv"],
                   help="file format: RecBole .inter, MovieLens u.data / ratings.dat / "
                        "ratings.csv, 'user item' pairs, or a csv with named columns")
    g.add_argument("--user-col", default="user", help="csv: user column name")
    g.add_argument("--item-col", default="item", help="csv: item column name")
    g.add_argument("--time-col", default="timestamp",
                   help="csv: timestamp column name ('' for file order)")
    g.add_argument("--sep", default=",", help="csv: field separator")
    g.add_argument("--min-user", type=int, default=5, help="k-core: min interactions per user")
    g.add_argument("--min-item", type=int, default=5, help="k-core: min interactions per item")


def add_model_args(p: argparse.ArgumentParser, with_attention: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=M.model, choices=MODELS)
    if with_attention:
        g.add_argument("--attention", default=M.attention, choices=ATTENTIONS)
    g.add_argument("--max-len", type=int, default=M.max_len, help="history length fed to the model")
    g.add_argument("--hidden", type=int, default=M.hidden)
    g.add_argument("--layers", type=int, default=M.layers)
    g.add_argument("--heads", type=int, default=M.heads)
    g.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention")
    g.add_argument("--dropout", type=float, default=M.dropout)
    g.add_argument("--positions", default=M.positions, choices=POSITIONS,
                   help="learned position embeddings or rotary (RoPE) in attention")
    g.add_argument("--loss", default=M.loss, choices=LOSSES,
                   help="ce: softmax over all items; sampled: sampled softmax")
    g.add_argument("--num-negatives", type=int, default=M.num_negatives,
                   help="negatives per batch for --loss sampled")
    g.add_argument("--mask-prob", type=float, default=M.mask_prob, help="BERT4Rec cloze rate")
    s = p.add_argument_group("BlossomRec sparse pattern")
    s.add_argument("--block-len", type=int, default=M.block_len, help="compression block")
    s.add_argument("--stride", type=int, default=M.stride, help="compression stride")
    s.add_argument("--block-size", type=int, default=M.block_size, help="selection block")
    s.add_argument("--top-n", type=int, default=M.top_n, help="selected blocks per query")
    s.add_argument("--window", type=int, default=M.window, help="local window (STIS)")
    _bool_flag(s, "dilated", M.dilated, "add power-of-two offsets to the window")
    _bool_flag(s, "compressed-branch", M.compressed_branch, "NSA's compressed-attention branch")
    s.add_argument("--compressor", default=M.compressor, choices=["mean", "mlp"])


def add_train_args(p: argparse.ArgumentParser, epochs: int = T.epochs) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=T.batch_size,
                   help="global batch (split across torchrun processes)")
    g.add_argument("--lr", type=float, default=T.lr)
    g.add_argument("--weight-decay", type=float, default=T.weight_decay)
    g.add_argument("--patience", type=int, default=T.patience,
                   help="early stopping: epochs without a better valid NDCG@10")
    g.add_argument("--seed", type=int, default=T.seed)
    g.add_argument("--device", default=T.device, help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--eval-batch-size", type=int, default=T.eval_batch_size)
    _bool_flag(g, "exclude-seen", T.exclude_seen, "rank only items the user has not seen")
    _bool_flag(g, "sampled-eval", T.sampled_eval,
               "also report the paper's sampled protocol (100 uniform negatives)")
    _bool_flag(g, "amp", T.amp, "bf16 autocast on CUDA")
    _bool_flag(g, "progress", T.progress, "tqdm progress bars")
    g.add_argument("--threads", type=int, default=T.threads, help="torch CPU threads (0: default)")


def data_spec(a):
    from .rec.data import DataSpec
    return DataSpec(data=a.data, format=a.format, user_col=a.user_col, item_col=a.item_col,
                    time_col=a.time_col or None, sep=a.sep, min_user=a.min_user,
                    min_item=a.min_item)


def model_config(a, attention: Optional[str] = None) -> ModelConfig:
    return ModelConfig(
        model=a.model, attention=attention or a.attention, max_len=a.max_len, hidden=a.hidden,
        layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, dropout=a.dropout,
        positions=a.positions, block_len=a.block_len, stride=a.stride, block_size=a.block_size,
        top_n=a.top_n, window=a.window, dilated=a.dilated, compressed_branch=a.compressed_branch,
        compressor=a.compressor, loss=a.loss, num_negatives=a.num_negatives,
        mask_prob=a.mask_prob).check()


def train_config(a) -> TrainConfig:
    return TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                       weight_decay=a.weight_decay, patience=a.patience, seed=a.seed,
                       device=a.device, eval_batch_size=a.eval_batch_size,
                       exclude_seen=a.exclude_seen, sampled_eval=a.sampled_eval, amp=a.amp,
                       progress=a.progress, threads=a.threads)


# ------------------------------------------------------------------------------ commands
def cmd_data(a) -> int:
    from .rec.data import load_sequences, resolve_path
    spec = data_spec(a)
    path = resolve_path(spec)
    d = load_sequences(spec).describe()
    if a.json:
        print(json.dumps({"path": path, **d}, indent=2))
        return 0
    print(f"dataset      {spec.data}  ({path})")
    print(f"filtering    {spec.min_user}-core users, {spec.min_item}-core items")
    print(f"users        {d['users']}")
    print(f"items        {d['items']}")
    print(f"interactions {d['interactions']}  (density {d['density']:.4%})")
    print(f"history      min {d['length_min']}, median {d['length_median']:.0f}, "
          f"mean {d['length_mean']:.1f}, p90 {d['length_p90']:.0f}, max {d['length_max']}")
    return 0


def _print_metrics(title: str, metrics: dict) -> None:
    keys = [k for k in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")]
    print(title)
    print("  " + "  ".join(f"{k} {metrics[k]:.4f}" for k in keys))
    sampled = [k for k in metrics if k.startswith("sampled100/")]
    if sampled:
        print("  sampled protocol (100 negatives): " + "  ".join(
            f"{k.split('/')[1]} {metrics[k]:.4f}" for k in sampled
            if k.split("/")[1] in keys))


def cmd_train(a) -> int:
    from .rec import distributed
    from .rec.data import load_sequences
    from .rec.prepare import leave_one_out
    from .rec.train import resolve_device, train_model
    mcfg, tcfg = model_config(a), train_config(a)
    info = distributed.from_env()
    device = resolve_device(tcfg.device, info)
    info = distributed.setup(device)
    try:
        split = leave_one_out(load_sequences(data_spec(a), quiet=not info.is_main))
        res = train_model(split, mcfg, tcfg, out_dir=a.out, resume=a.resume, info=info)
    finally:
        distributed.teardown()
    if info.is_main:
        print(f"{mcfg.model} / {mcfg.attention}: best epoch {res['best_epoch']} of "
              f"{res['epochs_run']}, {res['time_per_epoch_s']:.2f} s/epoch, peak memory "
              f"{res['peak_memory_bytes'] / 2 ** 20:.1f} MiB")
        _print_metrics("valid (best epoch, full ranking)", res["valid"])
        _print_metrics("test (full ranking)", res["test"])
        if a.out:
            print(f"written to {a.out}/ (result.json, last.pt, best.pt)")
    return 0


def cmd_compare(a) -> int:
    from .rec.compare import compare
    from .rec.report import markdown_report
    rep = compare(data_spec(a), model_config(a, attention="dense"), train_config(a),
                  out_dir=a.out, seeds=a.seeds, bench_lens=a.bench_lens if a.bench else (),
                  bench_seqs=a.bench_seqs, bench_batch=a.bench_batch,
                  bench_items=a.bench_items, plots=a.plots, resume=a.resume)
    print(markdown_report(rep))
    print(f"report: {os.path.join(a.out, 'report.json')}, {os.path.join(a.out, 'report.md')}"
          + (", " + ", ".join(rep.get("plots", [])) if rep.get("plots") else ""))
    return 0


def cmd_bench(a) -> int:
    from .rec.bench import bench_point
    from .rec.config import to_dict  # noqa: F401
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    points = []
    for L in a.lens:
        for att in a.attentions:
            p = bench_point(model_config(a, attention=att), L, num_seqs=a.bench_seqs,
                            num_items=a.bench_items, batch_size=a.bench_batch, device=a.device,
                            amp=a.amp)
            points.append(p)
            print(f"max_len {L:5d}  {att:8s}  {p['time_per_epoch_s']:8.2f} s/epoch  "
                  f"{p['peak_memory_bytes'] / 2 ** 20:9.1f} MiB", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(points, f, indent=2)
    return 0


def cmd_job(a) -> int:
    from .rec.jobs import execute
    execute(a.job)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blossom-rec", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", metavar="{data,train,compare,bench-len}")

    d = sub.add_parser("data", help="fetch, prepare and describe a dataset")
    add_data_args(d)
    d.add_argument("--json", action="store_true", help="print the description as JSON")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train and evaluate one model")
    add_data_args(t)
    add_model_args(t)
    add_train_args(t)
    t.add_argument("--out", default=None, help="directory for checkpoints and result.json")
    t.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="dense vs BlossomRec on the same split and budget")
    add_data_args(c)
    add_model_args(c, with_attention=False)
    add_train_args(c)
    c.add_argument("--seeds", type=int, default=1, help="seeds per attention (run-to-run spread)")
    c.add_argument("--out", default="runs/compare", help="report directory")
    c.add_argument("--resume", action="store_true", help="continue interrupted runs in --out")
    _bool_flag(c, "bench", True, "also time an epoch against history length")
    c.add_argument("--bench-lens", type=_ints, default=[50, 200, 1000])
    c.add_argument("--bench-seqs", type=int, default=32, help="synthetic histories per point")
    c.add_argument("--bench-batch", type=int, default=16)
    c.add_argument("--bench-items", type=int, default=2000)
    _bool_flag(c, "plots", True, "write PNG plots (needs matplotlib)")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench-len", help="epoch time and memory vs history length")
    add_model_args(b, with_attention=False)
    b.add_argument("--lens", type=_ints, default=[50, 200, 1000])
    b.add_argument("--attentions", type=lambda s: s.split(","), default=list(ATTENTIONS))
    b.add_argument("--bench-seqs", type=int, default=32)
    b.add_argument("--bench-batch", type=int, default=16)
    b.add_argument("--bench-items", type=int, default=2000)
    b.add_argument("--device", default="auto")
    b.add_argument("--threads", type=int, default=0)
    _bool_flag(b, "amp", True, "bf16 autocast on CUDA")
    b.add_argument("--out", default=None, help="write the points as JSON")
    b.set_defaults(func=cmd_bench)

    j = sub.add_parser("_job")  # internal: one job in a fresh process (see rec/jobs.py)
    j.add_argument("job")
    j.set_defaults(func=cmd_job)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    try:
        return a.func(a)
    except RecError as e:
        print(f"blossom-rec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blossom-rec: interrupted (use --resume with the same --out to continue)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
