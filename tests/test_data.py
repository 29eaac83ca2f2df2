"""tokenmix_train.data: the class count of a split against --num-classes, and the transform passthrough of the
datasets that serve another dataset's samples."""
from types import SimpleNamespace

import pytest
import torch

from tokenmix_train.data import DatasetView, num_dataset_classes, resolve_num_classes
from tokenmix_train.evaluate import ShardedDataset
from tokenmix_train.occlusion import OccludedDataset
from tokenmix_train.teacher_maps import StoredMapDataset


def _split(num_classes):
    """A dataset whose reader lists `num_classes` classes (None: a reader without a class index)."""
    classes = None if num_classes is None else {str(i): i for i in range(num_classes)}
    return SimpleNamespace(reader=SimpleNamespace(class_to_idx=classes))


def test_class_count_comes_from_the_flag_else_the_split():
    assert num_dataset_classes(_split(4)) == 4 and num_dataset_classes(_split(None)) is None
    assert resolve_num_classes(None, _split(4), 'the train split') == 4
    assert resolve_num_classes(10, _split(4), 'the train split') == 10  # more outputs than classes: allowed
    assert resolve_num_classes(4, _split(4), 'the train split') == 4
    assert resolve_num_classes(7, _split(None), 'the train split') == 7


def test_class_count_errors_name_the_flag_and_the_split():
    with pytest.raises(ValueError, match=r'^--num-classes 3 is less than the 4 classes of --split val$'):
        resolve_num_classes(3, _split(4), '--split val')
    with pytest.raises(ValueError, match=r'^--num-classes 3 is less than the 4 classes of the train split$'):
        resolve_num_classes(3, _split(4), 'the train split')
    with pytest.raises(ValueError, match=r'^--num-classes is required for this dataset \(it does not list its '
                                         r'classes\)$'):
        resolve_num_classes(None, _split(None), 'the train split')


class Images:
    """A dataset with a transform attribute, as timm's are."""

    def __init__(self):
        self.transform = None

    def __len__(self):
        return 4


def test_a_view_reads_and_writes_the_wrapped_transform():
    base = Images()
    views = [DatasetView(base), ShardedDataset(base, 0, 2), OccludedDataset(base, torch.zeros(4, 2, 2), 8)]
    for value, view in enumerate(views):
        view.transform = value
        assert base.transform == value and view.transform == value and view.dataset is base
    base.transform = 'set below'
    assert [view.transform for view in views] == ['set below'] * 3
    assert issubclass(StoredMapDataset, DatasetView)
