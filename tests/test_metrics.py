import pytest
import torch

from mmkern.metrics import classification_metrics, confusion_matrix


def _by_hand(predictions, labels):
    classes = sorted(set(labels.tolist()) | set(predictions.tolist()))
    recalls, f1s = [], []
    for c in classes:
        tp = int(((predictions == c) & (labels == c)).sum())
        support, predicted = int((labels == c).sum()), int((predictions == c).sum())
        recall = tp / support if support else 0.0
        precision = tp / predicted if predicted else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return (float((predictions == labels).double().mean()), sum(recalls) / len(classes), sum(f1s) / len(classes))


def test_metrics_match_their_definitions():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(7, (60,), generator=generator)
        predictions = torch.where(
            torch.rand(60, generator=generator) < 0.6, labels, torch.randint(9, (60,), generator=generator)
        )
        metrics = classification_metrics(confusion_matrix(predictions, labels, 9))
        expected = _by_hand(predictions, labels)
        assert metrics["accuracy"] == pytest.approx(expected[0], abs=1e-12)
        assert metrics["macro_recall"] == pytest.approx(expected[1], abs=1e-12)
        assert metrics["macro_f1"] == pytest.approx(expected[2], abs=1e-12)
        assert metrics["samples"] == 60


def test_metrics_against_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    labels, predictions = torch.tensor([0, 1, 2, 2, 3, 3, 3]), torch.tensor([0, 2, 2, 2, 3, 1, 4])
    metrics = classification_metrics(confusion_matrix(predictions, labels, 5))
    assert metrics["macro_recall"] == pytest.approx(
        sklearn_metrics.recall_score(labels, predictions, average="macro", zero_division=0)
    )
    assert metrics["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(labels, predictions, average="macro", zero_division=0)
    )


def test_metrics_edges():
    assert classification_metrics(torch.zeros(3, 3, dtype=torch.long))["accuracy"] == 0.0
    perfect = classification_metrics(confusion_matrix(torch.arange(4), torch.arange(4), 4))
    assert perfect == {"accuracy": 1.0, "macro_recall": 1.0, "macro_f1": 1.0, "samples": 4}
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(3), torch.zeros(4), 2)
