"""benchmarks/map_fidelity.py: rows share masks, a perfect map has zero error, quartiles, map kinds, the CLI."""
import numpy as np
import pytest
import torch

from conftest import load_script

bench = load_script('benchmarks/map_fidelity.py')


def _objects(n: int = 8, size: int = 16) -> torch.Tensor:
    """Rectangles of different sizes and places, so area weights miss the true shares."""
    objects = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        side = 3 + i
        top, left = (5 * i) % (size - side + 1), (3 * i) % (size - side + 1)
        objects[i, top:top + side, left:left + side] = True
    return objects


def test_rows_share_masks_and_a_perfect_map_is_exact():
    objects = _objects()
    labels = torch.arange(8) % 4
    maps = {'area': None, 'area again': None, 'perfect': objects.float(),
            'perfect 2x2': bench.oracle_maps(objects, (2, 2))}
    quartile, _ = bench.quartile_of(bench.object_pixel_share(objects))
    out = bench.measure(labels, objects, maps, patch_size=4, min_tokens=1, draws=3, batch_size=8, quartile=quartile)
    assert out['area'].shape == (3, 5)
    np.testing.assert_array_equal(out['area'], out['area again'])   # same masks and pairs in every row
    assert np.abs(out['perfect']).max() < 1e-6                       # the object itself on the token grid: exact
    assert out['area'][:, 0].mean() > out['perfect 2x2'][:, 0].mean() > 0.01  # coarse map: between the two


def test_quartile_columns_split_the_batch_error():
    # centred squares of sides 2-9 all hold the 4 central tokens, so no pair has both true shares 0 (a 0 / 0 pair
    # is left out of the error); one batch of all 8 images holds 2 of each quartile, so the 4 quartile columns
    # average to the batch's error, and they differ (the objects' sizes differ)
    objects = torch.zeros(8, 16, 16, dtype=torch.bool)
    for i, side in enumerate(range(2, 10)):
        start = 8 - side // 2
        objects[i, start:start + side, start:start + side] = True
    quartile, _ = bench.quartile_of(bench.object_pixel_share(objects))
    assert quartile.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    out = bench.measure(torch.arange(8) % 4, objects, {'area': None}, patch_size=4, min_tokens=1, draws=4,
                        batch_size=8, quartile=quartile)['area']
    np.testing.assert_allclose(out[:, 1:].mean(1), out[:, 0], rtol=1e-5)
    assert out[:, 0].min() > 0.01 and len(set(out[0, 1:].round(6))) > 1


def test_whole_image_objects_make_area_weights_exact():
    objects = torch.ones(4, 8, 8, dtype=torch.bool)
    out = bench.measure(torch.tensor([0, 1, 2, 3]), objects, {'area': None}, patch_size=2, min_tokens=2,
                        draws=2, batch_size=4)
    assert np.abs(out['area'][:, 0]).max() < 1e-6


def test_quartiles_and_pixel_share():
    index, edges = bench.quartile_of(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]))
    assert index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert edges == pytest.approx([0.1, 0.275, 0.45, 0.625, 0.8])
    assert bench.object_pixel_share(_objects()[:2]).tolist() == pytest.approx([9 / 256, 16 / 256])


def test_map_kinds():
    maps = torch.tensor([[[[3.]], [[1.]], [[2.]]], [[[0.]], [[5.]], [[4.]]]])  # B=2, C=3, 1 x 1
    own = bench.own_maps_of(maps, torch.tensor([2, 2]), topk=[1], softmax=True)
    assert own['whole'].flatten().tolist() == [2., 4.]
    assert own['top-1'].flatten().tolist() == [0., 0.]                # class 2 is second at both positions
    soft = maps.softmax(1)[:, 2].flatten()
    assert own['softmax'].flatten().tolist() == pytest.approx(soft.tolist())
    assert own['softmax'][0].item() == pytest.approx(np.exp(2) / (np.exp(3) + np.exp(1) + np.exp(2)))


@pytest.mark.slow
def test_cli_rows_and_bad_flags(tiny_data, teacher_checkpoint, capsys):
    assert bench.main(['--data-dir', tiny_data, '--teacher-checkpoint', teacher_checkpoint, '--images', '30',
                       '-b', '10', '--draws', '2', '--teacher-img-size', '64', '0', '--topk', '1', '--softmax',
                       '--oracle', '--patch-size', '4', '8', '--min-tokens', '5', '1',
                       '--reference', 'oracle 8x8']) == 0
    out = capsys.readouterr().out
    assert '@64px' in out and '@32px' in out and '8x8 maps' in out and '4x4 maps' in out
    tables = out.split('\n\n')[1:]
    assert len(tables) == 2 and '4 px tokens (8x8)' in tables[0] and '8 px tokens (4x4)' in tables[1]
    for table, exact in zip(tables, ('| oracle 8x8 | 0.0000 ± 0.0000 |', '| oracle 4x4 | 0.0000 ± 0.0000 |')):
        assert exact in table                       # a perfect map at the token grid's resolution
        assert '| row | error | vs oracle 8x8 |' in table
        assert sum(line.startswith('| ') and 'px ' in line for line in table.splitlines()) == 2 * 3  # 2 sizes x 3 maps
    with pytest.raises(SystemExit) as e:
        bench.main(['--data-dir', tiny_data, '--patch-size', '4', '8', '--min-tokens', '5'])
    assert e.value.code == 2 and 'one value per --patch-size' in capsys.readouterr().err
    assert bench.run_cli(bench.main, 'map_fidelity.py', ['--data-dir', teacher_checkpoint + '.missing']) == 2
    assert '--data-dir' in capsys.readouterr().err
    assert bench.run_cli(bench.main, 'map_fidelity.py',
                         ['--data-dir', tiny_data, '--images', '30', '-b', '10', '--reference', 'no such row']) == 2
    assert "--reference 'no such row' is not a row (rows: area)" in capsys.readouterr().err
