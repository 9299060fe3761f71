"""Ranking metrics against hand-computed cases, and the evaluation protocols."""
import math

import numpy as np
import pytest
import torch

from blossom_ops.rec.metrics import MetricSum, metrics_from_ranks, target_rank


def test_rank_counts_items_scored_at_least_as_high():
    scores = torch.tensor([[-math.inf, 0.9, 0.5, 0.7, 0.1],
                           [-math.inf, 0.2, 0.2, 0.2, 0.2],   # all tied: pessimistic rank
                           [-math.inf, 0.3, 0.1, 0.0, 0.2]])
    target = torch.tensor([2, 1, 1])
    assert target_rank(scores, target).tolist() == [2, 3, 0]


def test_candidates_restrict_the_ranking():
    scores = torch.tensor([[-math.inf, 0.9, 0.5, 0.7, 0.1]])
    cand = torch.tensor([[False, False, True, True, True]])  # item 1 excluded (seen)
    assert target_rank(scores, torch.tensor([2]), cand).tolist() == [1]
    cand[0, 3] = False
    assert target_rank(scores, torch.tensor([2]), cand).tolist() == [0]


def test_metric_values_by_hand():
    m = metrics_from_ranks(torch.tensor([0, 3, 7, 25]), ks=(5, 10, 20))
    assert m["HR@5"].tolist() == [1, 1, 0, 0]
    assert m["HR@10"].tolist() == [1, 1, 1, 0]
    assert m["HR@20"].tolist() == [1, 1, 1, 0]
    assert m["NDCG@5"].tolist() == pytest.approx([1.0, 1 / math.log2(5), 0, 0])
    assert m["NDCG@10"].tolist() == pytest.approx([1.0, 1 / math.log2(5), 1 / math.log2(9), 0])
    assert m["MRR@5"].tolist() == pytest.approx([1.0, 0.25, 0, 0])
    assert m["MRR"].tolist() == pytest.approx([1.0, 0.25, 0.125, 1 / 26])


def test_metric_sum_averages_and_roundtrips():
    acc = MetricSum()
    acc.add(torch.tensor([0, 3]))
    acc.add(torch.tensor([7, 25]))
    mean = acc.mean()
    assert mean["HR@10"] == pytest.approx(0.75)
    assert mean["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 4)
    other = MetricSum()
    other.load_tensor(acc.as_tensor())
    assert other.mean() == mean


class _Oracle(torch.nn.Module):
    """Scores item i as i, except the user's own target item, scored from a table."""

    def __init__(self, num_items, bonus):
        super().__init__()
        self.num_items, self.bonus = num_items, bonus
        self.training = False

    def eval_input(self, history):
        return list(history)

    def predict(self, items, lengths):
        scores = torch.arange(self.num_items + 1, dtype=torch.float32).repeat(len(items), 1)
        scores[:, 0] = -math.inf
        for b, seq in enumerate(items):
            key = tuple(seq[:lengths[b]].tolist())
            if key in self.bonus:
                item, value = self.bonus[key]
                scores[b, item] = value
        return scores


def test_evaluate_full_seen_exclusion_and_sampled():
    from blossom_ops.rec.evaluate import evaluate, sample_negatives
    from blossom_ops.rec.prepare import SequenceData, leave_one_out
    n = 200
    seqs = [np.array([150, 160, 170, 5]), np.array([180, 190, 3, 199])]
    split = leave_one_out(SequenceData(seqs, n))
    # test target of user 0 is item 5 scored 195.5: items 196..200 beat it -> rank 5
    # test target of user 1 is item 199 scored 199: only item 200 beats it -> rank 1
    model = _Oracle(n, {(150, 160, 170): (5, 195.5), (180, 190, 3): (199, 199.0)})
    full = evaluate(model, split, "test")
    assert full["HR@5"] == pytest.approx(0.5)          # rank 1 hits, rank 5 misses
    assert full["MRR"] == pytest.approx((1 / 6 + 1 / 2) / 2)
    excl = evaluate(model, split, "test", exclude_seen=True)
    assert excl == full  # seen items (150..190, 3) score below both targets: nothing changes
    # user 1 has seen 190 < 199, but if its target were beaten by a seen item, exclusion helps:
    model2 = _Oracle(n, {(150, 160, 170): (5, 169.5), (180, 190, 3): (199, 199.0)})
    a = evaluate(model2, split, "test")
    b = evaluate(model2, split, "test", exclude_seen=True)
    # user 0: items 170..200 beat 169.5 -> rank 31; without 170 (seen) -> rank 30
    assert a["MRR"] == pytest.approx((1 / 32 + 1 / 2) / 2)
    assert b["MRR"] == pytest.approx((1 / 31 + 1 / 2) / 2)
    neg = sample_negatives(split)
    assert neg.shape == (2, 100)
    for u in range(2):
        assert len(set(neg[u].tolist())) == 100
        assert not set(neg[u].tolist()) & set(split.full[u].tolist())
    assert (neg == sample_negatives(split)).all()  # fixed seed: same negatives for every model
    s = evaluate(model, split, "test", negatives=neg)
    # sampled rank of user 1's target (199, scored 199) = negatives above 199 (only 200)
    r1 = int((neg[1] > 199).sum())
    r0 = int((neg[0] > 195.5).sum())
    assert s["sampled100/MRR"] == pytest.approx((1 / (r0 + 1) + 1 / (r1 + 1)) / 2)
    assert s["MRR"] == full["MRR"]
