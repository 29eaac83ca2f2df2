"""benchmarks/bench_train.py: train.py's step on synthetic batches, run whole on the CPU with the tiny models; the
stored-map rows carry the records a --teacher-maps loader serves."""
import re

import pytest
import torch

from conftest import load_script
from tokenmix_train.teacher_maps import record_maps

bench = load_script('benchmarks/bench_train.py')


def test_stored_batches_carry_records_of_their_labels_whose_turned_maps_lose_corners():
    images, labels = torch.zeros(6, 3, 32, 32), torch.tensor([0, 3, 5, 7, 9, 2])
    (same, records), = bench.stored_batches([(images, labels)], 32)
    read_labels, maps = record_maps(records, (4, 4))
    assert same is images and torch.equal(read_labels, labels) and maps.shape == (6, 4, 4)
    assert (maps[1:3] > 0).all()  # not turned: the whole crop lies on the map, the label ranks first everywhere
    unchecked = records.clone()
    unchecked[:, 26:30] = float('inf')  # the two op slots' bounds (after 8 head values, the map's 6, the slots' 12)
    free = record_maps(unchecked, (4, 4))[1]
    for i in range(6):  # turned by 15 degrees (every third): the corners brought in read zero, the rest as before
        assert (maps[i] < free[i]).any() if i % 3 == 0 else torch.equal(maps[i], free[i])


@pytest.mark.slow  # a whole benchmark run, about 8 s
def test_whole_run_prints_each_configuration_and_the_stored_ratio(capsys):
    assert bench.main(['--device', 'cpu', '--steps', '2', '--warmup-steps', '1', '--rounds', '2', '-b', '4',
                       '--configs', 'tokenmix-area', 'tokenmix-stored']) == 0
    out = capsys.readouterr().out
    rows = {parts[0]: [float(v) for v in parts[1:3]] for parts in map(str.split, out.splitlines())
            if len(parts) > 3 and parts[0].startswith('tokenmix-') and parts[1] != '/'}
    assert set(rows) == {'tokenmix-area', 'tokenmix-stored'} and rows['tokenmix-area'][1] == 1.0
    assert rows['tokenmix-stored'][0] > 0
    pairs = re.search(r'same round: median ([\d.]+) \(rounds ([\d.]+), ([\d.]+); goal >= 0.98\)', out)
    rounds = sorted(float(pairs.group(i)) for i in (2, 3))
    assert abs(float(pairs.group(1)) - sum(rounds) / 2) <= 1e-3  # the median of two rounds
    assert re.search(r"writing one image's record \(its 18 x 18 top-5 entry and geometry\) takes \d+ us", out)
