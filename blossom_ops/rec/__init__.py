"""Sequential recommenders (SASRec, BERT4Rec) with dense or BlossomRec attention: data,
models, training, evaluation and reports behind the ``blossom-rec`` command.

One job per module: formats (file readers), prepare (k-core, ids, leave-one-out split),
fetch (MovieLens-100k download and cache), data (load + cache), batches, models, metrics,
evaluate, train, checkpoint, distributed, memory, bench, jobs, compare, report, plots.
"""
