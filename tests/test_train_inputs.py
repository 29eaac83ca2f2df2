"""Bad input to train.py: a one-line message naming the flag or file, exit code 2, nothing written."""
import os
import shutil

import pytest
import timm
import torch


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    path = tmp_path / 'digits'
    shutil.copytree(tiny_data, path)
    return path


def _fails(train_script, argv, capsys, tmp_path):
    assert train_script.run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('train.py: error: ')
    assert not (tmp_path / 'out').exists()  # nothing half-written
    return err


def test_missing_data_dir(train_script, train_argv, capsys, tmp_path):
    err = _fails(train_script, train_argv(data=str(tmp_path / 'nowhere')), capsys, tmp_path)
    assert f"--data-dir '{tmp_path / 'nowhere'}' is not a directory" in err


def test_missing_split(train_script, train_argv, capsys, tmp_path, tiny_data):
    err = _fails(train_script, train_argv('--val-split', 'holdout'), capsys, tmp_path)
    assert "has no 'holdout' split folder (--val-split)" in err


def test_empty_class_folder(train_script, train_argv, capsys, tmp_path, data_copy):
    os.makedirs(data_copy / 'train' / '10')
    err = _fails(train_script, train_argv(data=str(data_copy)), capsys, tmp_path)
    assert f"class folder '{data_copy / 'train' / '10'}' holds no images" in err


def test_val_class_unknown_to_train(train_script, train_argv, capsys, tmp_path, data_copy):
    shutil.move(str(data_copy / 'val' / '9'), str(data_copy / 'val' / 'nine'))
    err = _fails(train_script, train_argv(data=str(data_copy)), capsys, tmp_path)
    assert 'has classes that the train split lacks: nine' in err


def test_input_size_not_divisible_by_patch(train_script, train_argv, capsys, tmp_path):
    argv = train_argv()
    argv[argv.index('--img-size') + 1] = '36'
    err = _fails(train_script, argv, capsys, tmp_path)
    assert '--img-size 36x36 is not a multiple of the patch size 8' in err


def test_token_size_must_tile_the_input(train_script, train_argv, capsys, tmp_path):
    argv = train_argv('--tokenmix', '--cutmix', '1', '--tokenmix-patch-size', '12')
    err = _fails(train_script, argv, capsys, tmp_path)
    assert 'not a multiple of the TokenMix token size 12 (--tokenmix-patch-size)' in err


def test_missing_teacher_checkpoint(train_script, train_argv, capsys, tmp_path):
    argv = train_argv('--tokenmix', '--cutmix', '1', '--teacher-model', 'tokenmix_cnn_teacher_64',
                      '--teacher-checkpoint', str(tmp_path / 'no.pth'))
    err = _fails(train_script, argv, capsys, tmp_path)
    assert f"--teacher-checkpoint '{tmp_path / 'no.pth'}': no such file" in err


def test_teacher_with_wrong_class_count(train_script, train_argv, capsys, tmp_path):
    teacher = timm.create_model('tokenmix_cnn_teacher_64', num_classes=7)
    path = tmp_path / 'teacher7.pth'
    torch.save(teacher.state_dict(), path)
    argv = train_argv('--tokenmix', '--cutmix', '1', '--teacher-model', 'tokenmix_cnn_teacher_64',
                      '--teacher-checkpoint', str(path))
    err = _fails(train_script, argv, capsys, tmp_path)
    assert 'classifier for 7 classes' in err and 'num_classes=10' in err


def test_fewer_classes_than_the_data(train_script, train_argv, capsys, tmp_path):
    err = _fails(train_script, train_argv('--num-classes', '5'), capsys, tmp_path)
    assert '--num-classes 5 is less than the 10 classes of the train split' in err


def test_unreadable_image_is_named(train_script, train_argv, capsys, tmp_path, data_copy):
    bad = data_copy / 'train' / '3' / '00002.png'
    bad.write_bytes(b'not a png')
    # read in a loader worker: the error crosses the process boundary and still reads as one line
    assert train_script.run_main(train_argv('--workers', '1', data=str(data_copy))) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot read image '{bad}'" in err and '--skip-bad-images' in err
    assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_unreadable_image_skipped_and_counted(train_script, train_argv, caplog, tmp_path, data_copy):
    bad = data_copy / 'train' / '3' / '00002.png'
    bad.write_bytes(b'not a png')
    assert train_script.run_main(train_argv('--epochs', '1', '--skip-bad-images', data=str(data_copy))) == 0
    assert f"skipped unreadable image '{bad}'" in caplog.text
    assert 'epoch 0: 1 unreadable images skipped so far' in caplog.text


def test_apex_amp_without_apex(train_script, train_argv, capsys, tmp_path):
    try:
        import apex  # noqa: F401
        pytest.skip('apex is installed')
    except ImportError:
        pass
    err = _fails(train_script, train_argv('--apex-amp'), capsys, tmp_path)
    assert '--apex-amp: NVIDIA apex is not installed' in err
