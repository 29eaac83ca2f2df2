"""tokenmix_train.results: label files read with errors naming the flag, what is recorded from logits, and the
result rows as a table, CSV and JSON."""
import csv
import json

import pytest
import torch

from tokenmix_train.errors import ConfigError
from tokenmix_train.results import (OutputRecorder, format_table, read_real_labels, read_valid_labels, result_columns,
                                    write_results)

ROWS = [dict(model='m', checkpoint='a.pth', top1=50.0, error=''),
        dict(model='m', checkpoint='b.pth', error='bad', top1='', macro_f1_score=12.5)]


class ValFiles:
    """Stands for a dataset of ImageNet val files: `filenames(basename=True)` as timm's datasets give them."""

    def __init__(self, names):
        self.names = names

    def filenames(self, basename: bool = False):
        return list(self.names)

    def __len__(self):
        return len(self.names)


def test_valid_labels_must_be_class_indices(tmp_path):
    labels = tmp_path / 'labels.txt'
    labels.write_text('3\n-1\n')
    with pytest.raises(ConfigError, match=f"--valid-labels '{labels}': class indices must be >= 0, got -1"):
        read_valid_labels(str(labels))
    labels.write_text('3\n\n5\n')
    assert read_valid_labels(str(labels)).tolist() == [3, 5]
    labels.write_text('3\nseven\n')
    with pytest.raises(ConfigError, match=f"--valid-labels '{labels}': not one integer a line"):
        read_valid_labels(str(labels))
    with pytest.raises(ConfigError, match=f"--valid-labels '{tmp_path / 'none.txt'}': No such file or directory"):
        read_valid_labels(str(tmp_path / 'none.txt'))


def test_real_labels_must_list_the_splits_imagenet_files(tmp_path):
    real = tmp_path / 'real.json'
    real.write_text(json.dumps([[7], [], [3]]))
    files = ValFiles([f'ILSVRC2012_val_{i:08d}.JPEG' for i in (1, 2, 3)])
    assert read_real_labels(files, str(real)).real_labels == {
        'ILSVRC2012_val_00000001.JPEG': [7], 'ILSVRC2012_val_00000002.JPEG': [], 'ILSVRC2012_val_00000003.JPEG': [3]}
    with pytest.raises(ConfigError, match=f"--real-labels '{real}' lists another number of images than the split "
                                          r"has \(2\)"):
        read_real_labels(ValFiles(files.names[:2]), str(real))
    with pytest.raises(ConfigError, match=f"--real-labels '{real}': 'cat.jpg' is not an ImageNet val file name"):
        read_real_labels(ValFiles(['cat.jpg'] + files.names[1:]), str(real))
    real.write_text('[[7], ')
    with pytest.raises(ConfigError, match=f"--real-labels '{real}': not valid JSON"):
        read_real_labels(files, str(real))


def test_recorder_gives_real_accuracy_and_averaged_scores(tmp_path):
    """Predictions 7, 7, 3 against ReaL labels {7}, none, {2}: top-1 1 of the 2 labelled images, top-5 both (2 is
    among the five best of the third); macro scores over targets 7, 7, 2."""
    real = tmp_path / 'real.json'
    real.write_text(json.dumps([[7], [], [2]]))
    files = ValFiles([f'ILSVRC2012_val_{i:08d}.JPEG' for i in (1, 2, 3)])
    logits = torch.zeros(3, 10)
    logits[0, 7] = logits[1, 7] = 1.
    logits[2] = torch.tensor([0., 0., .5, 1., .6, .7, .8, 0., 0., 0.])
    recorder = OutputRecorder(read_real_labels(files, str(real)), 'macro')
    recorder(logits[:2], torch.tensor([7, 7]))
    recorder(logits[2:], torch.tensor([2]))
    # precision: class 7 1.0, class 3 0.0, class 2 0.0 (no prediction) -> 1/3; recall: class 7 1.0, class 2 0.0,
    # class 3 0.0 (no target) -> 1/3; F1: class 7 1.0, the others 0.0 -> 1/3
    assert recorder.results() == dict(top1=50.0, top5=100.0, macro_precision=33.3333, macro_recall=33.3333,
                                      macro_f1_score=33.3333)
    assert OutputRecorder(None, None).results() == {}


def test_columns_keep_first_seen_order_with_error_last():
    assert result_columns(ROWS) == ['model', 'checkpoint', 'top1', 'macro_f1_score', 'error']
    assert result_columns([dict(a=1)]) == ['a']


def test_table_aligns_every_column():
    assert format_table(ROWS).splitlines() == [
        'model  checkpoint  top1  macro_f1_score  error',
        'm      a.pth       50.0                       ',
        'm      b.pth             12.5            bad  ']


def test_results_written_as_csv_or_json(tmp_path):
    path = tmp_path / 'new' / 'results.csv'
    write_results(ROWS, str(path), 'csv')
    with open(path, newline='') as f:
        assert list(csv.DictReader(f)) == [
            dict(model='m', checkpoint='a.pth', top1='50.0', macro_f1_score='', error=''),
            dict(model='m', checkpoint='b.pth', top1='', macro_f1_score='12.5', error='bad')]
    write_results(ROWS, str(path), 'json')
    assert json.loads(path.read_text()) == ROWS and path.read_text().endswith(']\n')
    (tmp_path / 'file').write_text('')
    with pytest.raises(ConfigError, match=f"--results-file '{tmp_path / 'file' / 'r.csv'}': File exists"):
        write_results(ROWS, str(tmp_path / 'file' / 'r.csv'), 'csv')


def test_an_empty_label_file_still_gives_class_indices(tmp_path):
    """torch makes an empty list a float tensor; class indices must stay integers (they index the logits)."""
    labels = tmp_path / 'labels.txt'
    labels.write_text('\n')
    read = read_valid_labels(str(labels))
    assert read.dtype == torch.long and read.numel() == 0


def test_json_results_are_indented_for_reading(tmp_path):
    path = tmp_path / 'results.json'
    write_results(ROWS[:1], str(path), 'json')
    assert path.read_text().splitlines()[:3] == ['[', '  {', '    "model": "m",']


def test_recorder_gathers_every_ranks_predictions_without_warnings(tmp_path):
    """In a one-process gloo world the scores come from the gathered pairs; classes never predicted score 0
    without sklearn's UndefinedMetricWarning (zero_division set)."""
    import warnings

    import torch.distributed as dist
    from sklearn.exceptions import UndefinedMetricWarning
    recorder = OutputRecorder(None, 'macro')
    logits = torch.zeros(3, 4)
    logits[:, 1] = 1.  # always class 1
    recorder(logits, torch.tensor([1, 1, 2]))
    dist.init_process_group('gloo', store=dist.FileStore(str(tmp_path / 'store'), 1), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', UndefinedMetricWarning)
            scores = recorder.results()
    finally:
        dist.destroy_process_group()
    # precision: class 1 2/3, class 2 0 (never predicted) -> 1/3; recall: class 1 1, class 2 0 -> 1/2; F1 0.8 / 2
    assert scores == dict(macro_precision=33.3333, macro_recall=50.0, macro_f1_score=40.0)
