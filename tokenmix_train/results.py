"""validate.py's files beside the model: the label files it reads (--valid-labels, --real-labels), what it
records from each batch's logits (ReaL accuracy, --metrics-avg precision / recall / F1), and the result rows it
prints and writes (--results-file, CSV or JSON)."""
import csv
import importlib.util
import json
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from timm.data import RealLabelsImagenet

# scikit-learn is needed by --metrics-avg only, and imported then: it costs every validate.py run a second
has_sklearn = importlib.util.find_spec('sklearn') is not None

from .distributed import process_group_active
from .errors import ConfigError

__all__ = ['has_sklearn', 'read_valid_labels', 'read_real_labels', 'OutputRecorder', 'result_columns',
           'format_table', 'write_results']


def read_valid_labels(path: str) -> torch.Tensor:
    """The class indices of --valid-labels (one integer a line)."""
    try:
        with open(path) as f:
            labels = torch.tensor([int(line) for line in f if line.strip()], dtype=torch.long)
    except OSError as e:
        raise ConfigError(f"--valid-labels '{path}': {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"--valid-labels '{path}': not one integer a line ({e})") from None
    if len(labels) and int(labels.min()) < 0:  # a negative index would silently pick a class from the end
        raise ConfigError(f"--valid-labels '{path}': class indices must be >= 0, got {int(labels.min())}")
    return labels


def read_real_labels(dataset, path: str) -> RealLabelsImagenet:
    """timm's ReaL evaluator for the split's files, which must be ImageNet's val files that `path` lists."""
    try:
        real = RealLabelsImagenet(dataset.filenames(basename=True), real_json=path)
    except OSError as e:
        raise ConfigError(f"--real-labels '{path}': {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--real-labels '{path}': not valid JSON ({e})") from None
    except AssertionError:
        raise ConfigError(f"--real-labels '{path}' lists another number of images than the split "
                          f"has ({len(dataset)})") from None
    unknown = [f for f in real.filenames if f not in real.real_labels]
    if unknown:
        raise ConfigError(f"--real-labels '{path}': '{unknown[0]}' is not an ImageNet val file name "
                          f"(ILSVRC2012_val_NNNNNNNN.JPEG)")
    return real


class OutputRecorder:
    """Collects what --real-labels and --metrics-avg need from each batch's logits."""

    def __init__(self, real_labels: Optional[RealLabelsImagenet], metrics_avg: Optional[str]) -> None:
        self.real_labels, self.metrics_avg = real_labels, metrics_avg
        self.predictions: List[torch.Tensor] = []
        self.targets: List[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if self.real_labels is not None:
            self.real_labels.add_result(logits)
        if self.metrics_avg:
            self.predictions.append(logits.argmax(dim=1).cpu())
            self.targets.append(targets.cpu())

    def results(self) -> Dict[str, float]:
        """ReaL top-1/top-5 replacing the plain ones, and precision/recall/F1 over all ranks (%)."""
        out: Dict[str, float] = {}
        if self.real_labels is not None:
            out.update(top1=self.real_labels.get_accuracy(k=1), top5=self.real_labels.get_accuracy(k=5))
        if self.metrics_avg:
            pairs = [(torch.cat(self.predictions), torch.cat(self.targets))]
            if process_group_active():
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, pairs[0])
                pairs = gathered
            predictions = torch.cat([p for p, _ in pairs]).numpy()
            targets = torch.cat([t for _, t in pairs]).numpy()
            avg = self.metrics_avg
            from sklearn.metrics import f1_score, precision_score, recall_score
            for name, score in (('precision', precision_score), ('recall', recall_score), ('f1_score', f1_score)):
                out[f'{avg}_{name}'] = round(100 * score(targets, predictions, average=avg, zero_division=0), 4)
        return out


def result_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """Every key of the rows in first-seen order, `error` last (a folder's unreadable file has no metrics)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [c for c in columns if c != 'error'] + ['error'] * ('error' in columns)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    columns = result_columns(rows)
    cells = [columns] + [[str(r.get(c, '')) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells)


def write_results(rows: List[Dict[str, Any]], path: str, fmt: str) -> None:
    """All rows to `path` (--results-file), as CSV (header + one line a row) or a JSON list (`fmt` 'json')."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = open(path, 'w', newline='')
    except OSError as e:
        raise ConfigError(f"--results-file '{path}': {e.strerror}") from None
    with f:
        if fmt == 'json':
            json.dump(rows, f, indent=2)
            f.write('\n')
        else:
            writer = csv.DictWriter(f, fieldnames=result_columns(rows), restval='')
            writer.writeheader()
            writer.writerows(rows)
