"""NER scores against hand computation, and the CRF against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from imagen.metrics.ner import entity_report, token_report
from imagen.models.ner import ConditionalRandomField

GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-LOC", "I-LOC"]]
PRED = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "I-LOC", "I-LOC"]]


def test_entity_scores_equal_hand_computation():
    # gold entities: PER(0-1), LOC(3); ORG(0), LOC(2-3). predicted: PER(0-1), ORG(3); ORG(0), LOC(2-3) read
    # conlleval-style (an I- after O starts an entity). Correct: PER, ORG(0), LOC(2-3) -> 3 of 4 each way.
    report = entity_report(GOLD, PRED)
    assert report["micro avg"] == pytest.approx(
        {"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "support": 4}
    )
    assert report["PER"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1})
    assert report["LOC"] == pytest.approx({"precision": 1.0, "recall": 1 / 2, "f1": 2 / 3, "support": 2})
    assert report["ORG"] == pytest.approx({"precision": 1 / 2, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert report["macro avg"]["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert report["weighted avg"]["f1"] == pytest.approx((1 * 1 + 2 * 2 / 3 + 1 * 2 / 3) / 4)

    # strict IOB2: "I-LOC I-LOC" is no entity, so LOC(2-3) is missed: 2 correct of 3 predicted, 4 gold
    strict = entity_report(GOLD, PRED, mode="strict")["micro avg"]
    assert strict["precision"] == pytest.approx(2 / 3)
    assert strict["recall"] == pytest.approx(2 / 4)
    assert strict["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))


@pytest.mark.parametrize(
    "mode, listed",
    [
        ("conlleval", [("Paris", "LOC"), ("Anna Bolt", "PER"), ("Rome", "LOC")]),
        ("strict", [("Anna Bolt", "PER"), ("Rome", "LOC")]),  # the I-LOC after O is no entity
    ],
)
def test_listed_entities_are_those_the_scoring_mode_counts(mode, listed):
    from imagen.cli.sample_ner import entities_of, words_of

    text = "Paris : Anna Bolt left Rome"
    tags = ["I-LOC", "O", "B-PER", "I-PER", "O", "B-LOC"]
    _, spans = words_of(text)
    found = entities_of(text, spans, tags, [0.5, 1.0, 0.9, 0.7, 1.0, 0.6], mode)
    assert [(e["text"], e["type"]) for e in found] == listed
    assert all(text[e["start"] : e["end"]] == e["text"] for e in found)
    assert found[-2]["score"] == pytest.approx(0.8)  # the mean of its words' probabilities
    # as many as the F1 of that mode counts (each entity scored against itself)
    assert entity_report([tags], [tags], mode)["micro avg"]["support"] == len(listed)
    with pytest.raises(ValueError, match="scoring mode 'iob' is unknown"):
        entities_of(text, spans, tags, [1.0] * 6, "iob")


def test_token_report_matches_the_flattened_tags():
    report = token_report(GOLD, PRED, labels=["O", "B-LOC", "I-LOC", "B-ORG", "B-PER", "I-PER"])
    # flattened: gold  B-PER I-PER O B-LOC B-ORG O     B-LOC I-LOC
    #            pred  B-PER I-PER O B-ORG B-ORG O     I-LOC I-LOC
    assert report["O"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2})
    assert report["B-LOC"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2})
    assert report["I-LOC"] == pytest.approx({"precision": 1 / 2, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert report["B-ORG"] == pytest.approx({"precision": 1 / 2, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert list(report)[:6] == ["O", "B-LOC", "I-LOC", "B-ORG", "B-PER", "I-PER"]
    assert report["micro avg"] == pytest.approx(
        {"precision": 6 / 8, "recall": 6 / 8, "f1": 6 / 8, "support": 8}
    )
    assert report["macro avg"]["recall"] == pytest.approx((1 + 0 + 1 + 1 + 1 + 1) / 6)
    assert report["weighted avg"]["precision"] == pytest.approx(
        (2 * 1 + 2 * 0 + 1 * 0.5 + 1 * 0.5 + 1 + 1) / 8
    )

    # an independent implementation over the same flattened tags agrees on every row
    from sklearn.metrics import precision_recall_fscore_support

    flat_gold = [t for s in GOLD for t in s]
    flat_pred = [t for s in PRED for t in s]
    tags = ["O", "B-LOC", "I-LOC", "B-ORG", "B-PER", "I-PER"]
    p, r, f, s = precision_recall_fscore_support(flat_gold, flat_pred, labels=tags, zero_division=0)
    for i, tag in enumerate(tags):
        assert (report[tag]["precision"], report[tag]["recall"], report[tag]["f1"]) == pytest.approx(
            (p[i], r[i], f[i])
        )
        assert report[tag]["support"] == s[i]


@torch.no_grad()
def test_crf_matches_brute_force():
    torch.manual_seed(0)
    num_tags, width = 3, 4
    crf = ConditionalRandomField(num_tags)
    for p in crf.parameters():
        p.normal_()
    emissions = torch.randn(2, width, num_tags)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    best = crf.viterbi(emissions, mask)
    for row in range(2):
        n = int(mask[row].sum())
        paths = list(itertools.product(range(num_tags), repeat=n))
        scores = []
        for path in paths:
            tags = torch.tensor([list(path) + [0] * (width - n)])
            scores.append(crf.score(emissions[row : row + 1], tags, mask[row : row + 1])[0])
        scores = torch.stack(scores)
        assert crf.log_partition(emissions[row : row + 1], mask[row : row + 1])[0] == pytest.approx(
            torch.logsumexp(scores, 0).item(), abs=1e-5
        )
        assert best[row, :n].tolist() == list(paths[int(scores.argmax())])
        assert best[row, n:].tolist() == [0] * (width - n)
