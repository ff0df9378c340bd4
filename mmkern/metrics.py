"""Classification metrics: accuracy, and recall and F1 averaged over classes (macro)."""

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows the true class, columns the predicted one."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    index = labels.long().flatten() * num_classes + predictions.long().flatten()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def classification_metrics(confusion: torch.Tensor) -> dict:
    """Accuracy, macro recall and macro F1 from a confusion matrix. Classes absent from the labels are
    left out of the macro averages (their recall is undefined) unless they were predicted, which
    then counts as an F1 of 0 for them, as scikit-learn's ``labels`` of the union do."""
    confusion = confusion.double()
    true_positives = confusion.diagonal()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    recall = torch.where(support > 0, true_positives / support.clamp(min=1), torch.zeros_like(support))
    precision = torch.where(predicted > 0, true_positives / predicted.clamp(min=1), torch.zeros_like(predicted))
    f1 = torch.where(
        precision + recall > 0,
        2 * precision * recall / (precision + recall).clamp(min=1e-300),
        torch.zeros_like(recall),
    )
    total = confusion.sum()
    count = int(present.sum())
    return {
        "accuracy": float(true_positives.sum() / total) if total > 0 else 0.0,
        "macro_recall": float(recall[present].sum() / count) if count else 0.0,
        "macro_f1": float(f1[present].sum() / count) if count else 0.0,
        "samples": int(total),
    }
