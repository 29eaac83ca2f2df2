"""validate.py takes every flag of timm's validate.py with timm's meaning; the tests check the effects."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import TrimBorder
from timm.layers import set_fast_norm
from torchvision import transforms

from tests.conftest import load_script
from tests.test_validate import TINY, constant_predictor, results, run, tiny_model
from tokenmix_train.validate_flags import build_validate_parser, parse_validate_args

# Every option string of timm's validate.py (huggingface/pytorch-image-models, main branch, 2026-08), plus
# --amp-impl, which timm 1.0.x had until 1.0.22.
TIMM_VALIDATE_FLAGS = (
    '--data-dir', '--dataset', '--split', '--num-samples', '--dataset-download', '--class-map', '--input-key',
    '--input-img-mode', '--target-key', '--dataset-trust-remote-code', '--model', '-m', '--pretrained', '-j',
    '--workers', '-b', '--batch-size', '--img-size', '--in-chans', '--input-size', '--use-train-size', '--crop-pct',
    '--crop-mode', '--crop-border-pixels', '--mean', '--std', '--interpolation', '--num-classes', '--gp',
    '--log-freq', '--checkpoint', '--num-gpu', '--test-pool', '--no-prefetcher', '--pin-mem', '--channels-last',
    '--device', '--amp', '--amp-dtype', '--model-dtype', '--tf-preprocessing', '--use-ema', '--fuser',
    '--fast-norm', '--reparam', '--model-kwargs', '--torchcompile-mode', '--torchscript', '--torchcompile',
    '--aot-autograd', '--results-file', '--results-format', '--real-labels', '--valid-labels', '--retry', '--seed',
    '--metrics-avg', '--naflex-loader', '--naflex-max-seq-len', '--amp-impl')


@pytest.fixture(scope='module')
def validate():
    return load_script('validate.py')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> str:
    """A tiny ViT that always predicts class 7, then 1, then 0."""
    path = str(tmp_path_factory.mktemp('ckpt') / 'const.pth')
    torch.save(constant_predictor([7, 1, 0]), path)
    return path


@pytest.fixture(scope='module')
def two_classes(tiny_data, tmp_path_factory) -> str:
    """Val classes '0' and '1' of the tiny data (3 images each) as ImageNet val files, in timm's order."""
    root = tmp_path_factory.mktemp('two') / 'data'
    index = 0
    for cls in ('0', '1'):
        os.makedirs(root / 'val' / cls)
        for name in sorted(os.listdir(os.path.join(tiny_data, 'val', cls))):
            index += 1
            shutil.copy(os.path.join(tiny_data, 'val', cls, name), root / 'val' / cls / f'ILSVRC2012_val_{index:08d}.JPEG')
    return str(root)


@pytest.fixture(scope='module')
def fitted_checkpoint(two_classes, tmp_path_factory) -> str:
    """A tiny ViT fitted to the 6 images of `two_classes`: its logits depend on the image (class 0 or 1 first, by
    a margin of about 1), unlike the constant predictor's."""
    images, labels = [], []
    for label in (0, 1):
        folder = os.path.join(two_classes, 'val', str(label))
        for name in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, name)) as image:
                pixels = transforms.functional.to_tensor(image.convert('RGB'))
            images.append(transforms.functional.normalize(pixels, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
            labels.append(label)
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.stack(images)), torch.tensor(labels)).backward()
        optimizer.step()
    path = str(tmp_path_factory.mktemp('fitted') / 'fitted.pth')
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def loaders(validate, monkeypatch):
    """The eval loaders validate.py builds, recorded as they are made."""
    built = []
    original = validate.build_eval_loader

    def record(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(validate, 'build_eval_loader', record)
    return built


def test_every_timm_flag_is_accepted():
    options = build_validate_parser()._option_string_actions
    missing = [flag for flag in TIMM_VALIDATE_FLAGS if flag not in options]
    assert not missing
    args = parse_validate_args(['--data-dir', 'd'])  # timm's defaults
    assert (args.model, args.batch_size, args.workers, args.log_freq, args.seed, args.split) == \
        ('dpn92', 256, 4, 10, 42, 'validation')
    assert args.pretrained and not args.checkpoint  # timm: no checkpoint means the pretrained weights
    both = parse_validate_args(['--data-dir', 'd', '--pretrained', '--checkpoint', 'c.pth'])
    assert not both.pretrained and both.pretrained_ignored  # the checkpoint's weights, nothing downloaded


def test_short_and_old_spellings_are_aliases():
    short = parse_validate_args(['--data-dir', 'd', '-m', 'resnet18', '--log-interval', '3'])
    long = parse_validate_args(['--data-dir', 'd', '--model', 'resnet18', '--log-freq', '3'])
    assert vars(short) == vars(long) and short.model == 'resnet18' and short.log_freq == 3


def _transform(loader):
    return list(loader.dataset.transform.transforms)


def test_crop_mode_border_pixels_and_normalisation_reach_the_transform(validate, two_classes, checkpoint, loaders,
                                                                      capsys):
    common = ['--data-dir', two_classes, '--split', 'val', *TINY, '--checkpoint', checkpoint, '-j', '0',
              '--num-classes', '10']
    assert run(validate, capsys, *common)[0] == 0
    assert run(validate, capsys, *common, '--crop-mode', 'squash', '--crop-border-pixels', '3',
               '--mean', '0.5', '0.5', '0.5', '--std', '0.2', '0.2', '0.2', '--interpolation', 'bicubic',
               '--no-prefetcher')[0] == 0
    default, changed = map(_transform, loaders)
    assert isinstance(default[0], transforms.Resize) and default[0].size == 32  # shorter side, then centre crop
    assert isinstance(default[1], transforms.CenterCrop)
    assert isinstance(changed[0], TrimBorder) and changed[0].border_size == 3
    assert isinstance(changed[1], transforms.Resize) and tuple(changed[1].size) == (32, 32)  # squash: both sides
    assert isinstance(changed[2], transforms.CenterCrop)  # then timm crops, a no-op here (crop_pct 1.0)
    assert changed[1].interpolation == transforms.InterpolationMode.BICUBIC
    norm = [t for t in changed if isinstance(t, transforms.Normalize)][0]
    assert norm.mean.tolist() == [0.5] * 3 and norm.std.tolist() == pytest.approx([0.2] * 3)


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_use_train_size_and_input_size(validate, two_classes, tmp_path, loaders, capsys):
    """The CNN teacher's config says 64 px; a test size of 48 px is used unless --use-train-size."""
    import timm
    torch.save(timm.create_model('tokenmix_cnn_teacher_64', num_classes=2).state_dict(), tmp_path / 'cnn.pth')
    common = ['--data-dir', two_classes, '--split', 'val', '-m', 'tokenmix_cnn_teacher_64', '--checkpoint',
              str(tmp_path / 'cnn.pth'), '-j', '0', '--patch-size', '8',
              '--model-kwargs', "pretrained_cfg_overlay={'test_input_size': (3, 48, 48)}"]
    for extra in ([], ['--use-train-size'], ['--input-size', '3', '40', '40']):
        assert run(validate, capsys, *common, *extra)[0] == 0
    sizes = [next(iter(loader))[0].shape[-1] for loader in loaders]
    assert sizes == [48, 64, 40]


def test_valid_labels_restrict_the_classes(validate, two_classes, checkpoint, tmp_path, capsys):
    """The model predicts class 7; the split's classes '0' and '1' are the model's classes 7 and 1."""
    common = ['--data-dir', two_classes, '--split', 'val', *TINY, '--checkpoint', checkpoint, '-j', '0',
              '--results-format', 'json']
    plain, subset = tmp_path / 'plain', tmp_path / 'subset'
    (tmp_path / 'valid.txt').write_text('7\n1\n')
    assert run(validate, capsys, *common, '--num-classes', '10', '--results-file', str(plain))[0] == 0
    assert run(validate, capsys, *common, '--valid-labels', str(tmp_path / 'valid.txt'),
               '--results-file', str(subset))[0] == 0
    assert results(plain)[0]['top1'] == 0.0  # 7 is never a target among 10 classes
    assert results(subset)[0]['top1'] == 50.0  # 7 is the first of the two: every class '0' image is right
    (tmp_path / 'three.txt').write_text('7\n1\n2\n')
    code, _, err = run(validate, capsys, *common, '--valid-labels', str(tmp_path / 'three.txt'))
    assert code == 2 and 'lists 3 classes' in err


def test_real_labels_replace_the_folder_labels(validate, two_classes, checkpoint, tmp_path, capsys):
    """ReaL labels: images 1-2 are 7, image 3 none (not counted), 4-6 are 3: the model (always 7) gets 2 of 5."""
    real = tmp_path / 'real.json'
    real.write_text(json.dumps([[7], [7, 2], [], [3], [3], [3]]))
    out = tmp_path / 'res.json'
    code, _, err = run(validate, capsys, '--data-dir', two_classes, '--split', 'val', *TINY, '--checkpoint',
                       checkpoint, '-j', '0', '--num-classes', '10', '--real-labels', str(real), '--results-file',
                       str(out))
    assert code == 0, err
    assert results(out)[0]['top1'] == 40.0
    real.write_text(json.dumps([[7]]))
    code, _, err = run(validate, capsys, '--data-dir', two_classes, '--split', 'val', *TINY, '--checkpoint',
                       checkpoint, '--num-classes', '10', '--real-labels', str(real))
    assert code == 2 and '--real-labels' in err and 'number of images' in err
    real.write_text('not json')
    code, _, err = run(validate, capsys, '--data-dir', two_classes, '--split', 'val', *TINY, '--checkpoint',
                       checkpoint, '--num-classes', '10', '--real-labels', str(real))
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"validate.py: error: --real-labels '{real}': not "
                                                                  'valid JSON'), err


def test_metrics_avg_and_results_format(validate, two_classes, checkpoint, tmp_path, capsys):
    """The model predicts 1 among classes {0, 1}: micro precision is the accuracy, macro recall (1 + 0) / 2."""
    out = tmp_path / 'res.txt'
    code, _, _ = run(validate, capsys, '--data-dir', two_classes, '--split', 'val', *TINY, '--checkpoint',
                     checkpoint, '-j', '0', '--num-classes', '10', '--valid-labels', str(_write(tmp_path, '0\n1\n')),
                     '--metrics-avg', 'macro', '--results-file', str(out), '--results-format', 'json')
    assert code == 0
    [row] = json.loads(out.read_text())  # JSON despite the .txt name
    assert row['top1'] == 50.0 and row['macro_recall'] == 50.0 and row['macro_precision'] == 25.0


def _write(tmp_path, text: str):
    path = tmp_path / 'labels.txt'
    path.write_text(text)
    return path


def test_retry_decays_the_batch_size_on_out_of_memory(validate, two_classes, checkpoint, monkeypatch, capsys):
    real_evaluate, sizes = validate.evaluate, []

    def small_memory(model, progress, *args, **kwargs):
        sizes.append(progress.loader.loader.batch_size if hasattr(progress.loader, 'loader')
                     else progress.loader.batch_size)
        if sizes[-1] > 2:
            raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return real_evaluate(model, progress, *args, **kwargs)
    monkeypatch.setattr(validate, 'evaluate', small_memory)
    common = ['--data-dir', two_classes, '--split', 'val', *TINY, '--checkpoint', checkpoint, '-j', '0',
              '--num-classes', '10', '-b', '8']
    assert run(validate, capsys, *common, '--retry')[0] == 0
    assert sizes == [8, 6, 4, 3, 2]  # timm's decay_batch_step
    with pytest.raises(RuntimeError, match='out of memory'):
        validate.run_main(common)


@pytest.mark.slow
def test_model_dtype_and_compile_give_the_same_numbers(validate, two_classes, fitted_checkpoint, tmp_path, capsys,
                                                       monkeypatch):
    """Each variant gives the plain run's top-1 / top-5 and logits: within 1e-5 in float32, 2e-2 in bfloat16 (8
    mantissa bits on logits of about 2; about 5e-3 seen)."""
    logits, real_evaluate = [], validate.evaluate

    def recording(*args, on_output, **kwargs):
        def record(batch_logits, targets):
            logits.append(batch_logits.clone())
            on_output(batch_logits, targets)
        return real_evaluate(*args, on_output=record, **kwargs)
    monkeypatch.setattr(validate, 'evaluate', recording)
    common = ['--data-dir', two_classes, '--split', 'val', *TINY, '--checkpoint', fitted_checkpoint, '-j', '0',
              '--num-classes', '10', '--results-format', 'json']
    variants = ([], ['--model-dtype', 'bfloat16'], ['--torchcompile', 'eager', '--torchcompile-mode', 'default'],
                ['--torchscript', '--fuser', 'te'], ['--aot-autograd'], ['--fast-norm'],
                ['--reparam', '--no-prefetcher', '--pin-mem', '--seed', '1'])
    runs = []
    for extra in variants:
        out = tmp_path / 'res.json'
        code, _, err = run(validate, capsys, *common, *extra, '--results-file', str(out))
        assert code == 0, err
        set_fast_norm(False)  # a global switch of timm's: leave it as other tests expect
        [row] = results(out)
        runs.append((row['top1'], row['top5'], torch.cat(logits)))
        logits.clear()
    plain = runs[0][2]
    assert plain.argmax(1).tolist() == [0, 0, 0, 1, 1, 1] and runs[0][:2] == (100.0, 100.0)
    for extra, (top1, top5, variant) in zip(variants, runs):
        tolerance = 2e-2 if 'bfloat16' in extra else 1e-5
        assert (top1, top5) == runs[0][:2] and torch.allclose(variant, plain, rtol=0, atol=tolerance), extra


def test_test_pool_takes_the_whole_image(validate, two_classes, tmp_path, loaders, capsys):
    """Above the model's own size (64 px) timm pools over the larger map, so the image is not centre-cropped."""
    import timm
    torch.save(timm.create_model('tokenmix_cnn_teacher_64', num_classes=2).state_dict(), tmp_path / 'cnn.pth')
    common = ['--data-dir', two_classes, '--split', 'val', '-m', 'tokenmix_cnn_teacher_64', '--checkpoint',
              str(tmp_path / 'cnn.pth'), '-j', '0', '--img-size', '96', '--crop-pct', '0.5', '--patch-size', '8']
    assert run(validate, capsys, *common)[0] == 0
    assert run(validate, capsys, *common, '--test-pool')[0] == 0
    assert [_transform(loader)[0].size for loader in loaders] == [192, 96]


def test_dataset_flags_reach_timms_create_dataset(validate, monkeypatch, capsys):
    seen = {}

    def create_dataset(name, **kwargs):
        seen.update(kwargs, name=name)
        raise validate.ConfigError('stop here')
    monkeypatch.setattr('tokenmix_train.data.create_dataset', create_dataset)
    code, _, err = run(validate, capsys, '--dataset', 'hfds/some/set', '--data-dir', '.', '--split', 'test',
                       '--dataset-download', '--input-key', 'jpg', '--target-key', 'cls', '--num-samples', '12',
                       '--dataset-trust-remote-code', '--in-chans', '1', '-m', 'resnet18')
    assert code == 2 and 'stop here' in err
    assert (seen['name'], seen['split'], seen['download'], seen['input_key'], seen['target_key']) == \
        ('hfds/some/set', 'test', True, 'jpg', 'cls')
    assert (seen['num_samples'], seen['trust_remote_code'], seen['input_img_mode']) == (12, True, 'L')


@pytest.mark.parametrize('argv,message', [
    (['--num-gpu', '2'], 'torchrun --nproc_per_node 2'),
    (['--naflex-loader'], '--naflex-loader'),
    (['--amp-impl', 'apex'], '--amp-impl apex'),
    (['--amp', '--model-dtype', 'bfloat16'], '--amp needs a float32 model'),
    (['--crop-mode', 'zoom'], '--crop-mode'),
])
def test_flags_that_cannot_apply_stop_with_one_line(validate, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        validate.run_main(['--data-dir', '.', '-m', 'resnet18', *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err


@pytest.mark.parametrize('argv,message', [
    (['-j', '-1'], '-j/--workers must be >= 0, got -1'),
    (['--crop-pct', '0'], '--crop-pct must be > 0, got 0.0'),
    (['--in-chans', '0'], '--in-chans must be >= 1, got 0'),
    (['--input-size', '3', '0', '0'], '--input-size must be >= 1, got 0'),
    (['--num-samples', '0'], '--num-samples must be >= 1, got 0'),
    (['--crop-border-pixels', '-2'], '--crop-border-pixels must be >= 0, got -2'),
    (['--mean', '0.5', '0.5'], '--mean takes 1 or 3 values (one per input channel), got 2'),
    (['--interpolation', 'nosuch'], '--interpolation nosuch: unknown interpolation'),
    (['--input-img-mode', 'XYZ'], '--input-img-mode XYZ: not a PIL image mode'),
    (['--torchcompile', 'nosuch'], '--torchcompile nosuch: unknown backend'),
    (['--fuser', 'nosuch'], "argument --fuser: invalid choice: 'nosuch'"),
    (['--occlusion', '1.0'], '--occlusion ratios must lie in [0, 1), got 1.0'),
    (['--patch-size', '0'], '--patch-size must be >= 1, got 0'),
])
def test_bad_values_are_one_line_naming_the_flag(validate, argv, message, capsys):
    """Checked with train.py's rules before any model or data is touched; the usage is not printed."""
    with pytest.raises(SystemExit) as exit_info:
        validate.run_main(['--data-dir', '.', '-m', 'resnet18', *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f'validate.py: error: {message}') and err.count('\n') == 1, err


def test_bulk_names_missing_weights_and_tensorflow_stop_with_one_line(validate, two_classes, monkeypatch, capsys):
    code, _, err = run(validate, capsys, '--data-dir', '.', '-m', 'all')
    assert code == 2 and 'unknown timm model' in err and 'one model at a time' in err
    code, _, err = run(validate, capsys, '--data-dir', two_classes, '--split', 'val', *TINY)  # no checkpoint
    assert code == 2 and 'pretrained weights are not available' in err and '--checkpoint' in err
    find_spec = validate.importlib.util.find_spec
    monkeypatch.setattr(validate.importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'tensorflow' else find_spec(name, *a))
    code, _, err = run(validate, capsys, '--data-dir', '.', '-m', 'resnet18', '--tf-preprocessing')
    assert code == 2 and 'needs TensorFlow' in err
