"""timm's train.py flags have their effect here: each group checked by what it changes, not only by parsing."""
import copy
import csv
import glob
import math
import os
import sys

import pytest
import timm
import torch
import yaml
from timm.data import resolve_data_config
from timm.layers import SyncBatchNormAct
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

import tokenmix_train.data as data_module
from conftest import TINY_STUDENT
from tests.train_spies import is_vit, spy_forwards
from tokenmix_train.args import parse_train_args
from tokenmix_train.data import build_dataset, build_train_loader
from tokenmix_train.distributed import sync_batchnorm
from tokenmix_train.engine import Training, _loss_scale
from tokenmix_train.errors import ConfigError
from tokenmix_train.mixing import build_criterion
from tokenmix_train.model import build_student

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


def _train_loader(tiny_data, *flags):
    args = parse_train_args(['--data-dir', tiny_data, *TINY_STUDENT, '-b', '8', '-j', '0', *flags])[0]
    args.distributed = False
    dataset = build_dataset(args, 'train', '--train-split', is_training=True)
    model = build_student(args, 10)
    return build_train_loader(dataset, args, resolve_data_config(vars(args), model=model), torch.device('cpu'))


def _rows(run):
    with open(run / 'summary.csv') as f:
        return list(csv.DictReader(f))


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def test_aug_repeats_uses_timms_repeat_sampler_on_one_process(tiny_data):
    loader = _train_loader(tiny_data, '--aug-repeats', '3')
    indices = list(loader.sampler)
    assert type(loader.sampler).__name__ == 'RepeatAugSampler' and len(indices) == 60  # epoch length kept
    assert all(indices[i] == indices[i + 1] == indices[i + 2] for i in range(0, 60, 3))  # each image 3 times
    assert len(set(indices)) == 20
    plain = list(_train_loader(tiny_data).sampler)
    assert sorted(plain) == list(range(60))


def test_scheduled_resolution_batches_change_size(tiny_data):
    loader = _train_loader(tiny_data, '--train-img-sizes', '32', '48', '--train-batch-sizes', '8', '4')
    sizes = {(images.shape[0], images.shape[-1]) for images, _ in loader}
    assert sizes == {(8, 32), (4, 48)}
    assert loader.batch_sampler.average_batch_size == 6.0  # constant schedule, uniform weights: (8 + 4) / 2
    run = Training(model=None, optimizer=None, criterion=None, device=torch.device('cpu'),
                   batch_loss_scale='sqrt', batch_size_reference=6.0)
    assert _loss_scale(run, 4) == pytest.approx((4 / 6) ** 0.5)
    run.batch_loss_scale = 'none'
    assert _loss_scale(run, 4) == 1.0


def test_aug_splits_give_clean_and_augmented_views_and_the_jsd_loss(tiny_data):
    loader = _train_loader(tiny_data, '--aug-splits', '3', '--jsd-loss', '--hflip', '0')
    images, targets = next(iter(loader))
    assert images.shape[0] == 24 and torch.equal(targets[:8], targets[8:16])  # 3 views of 8 images
    args = parse_train_args(['--data-dir', 'd', '--aug-splits', '3', '--jsd-loss', '--smoothing', '0.1'])[0]
    loss = build_criterion(args)
    assert isinstance(loss, JsdCrossEntropy) and loss.num_splits == 3
    logits = torch.randn(24, 10)
    same = loss(torch.cat([logits[:8]] * 3), targets)  # identical splits: no divergence term
    differ = loss(logits, targets)
    assert same.item() < differ.item()


def test_bce_sum_and_pos_weight_reach_timms_loss():
    base = ['--data-dir', 'd', '--bce-loss', '--mixup', '0.8']
    mean_loss = build_criterion(parse_train_args(base)[0])
    summed = build_criterion(parse_train_args(base + ['--bce-sum', '--bce-pos-weight', '2'])[0])
    assert isinstance(summed, BinaryCrossEntropy) and summed.sum_classes and summed.pos_weight.item() == 2.0
    logits, targets = torch.randn(4, 10), torch.full((4, 10), 0.1)
    no_weight = build_criterion(parse_train_args(base + ['--bce-sum'])[0])
    assert no_weight(logits, targets).item() == pytest.approx(10 * mean_loss(logits, targets).item(), rel=1e-5)


def test_model_flags_reach_the_model(tmp_path):
    args = parse_train_args(['--data-dir', 'd', '--model', 'mobilenetv3_small_050', '--bn-momentum', '0.3', '--bn-eps',
                             '0.01'])[0]
    bns = [m for m in build_student(args, 10).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.3 and m.eps == 0.01 for m in bns)
    with pytest.raises(ConfigError, match='--bn-momentum: --model resnet10t does not take it'):
        build_student(parse_train_args(['--data-dir', 'd', '--model', 'resnet10t', '--bn-momentum', '0.3'])[0], 10)
    args = parse_train_args(['--data-dir', 'd', '--model', 'resnet10t', '--drop-block', '0.2', '--head-init-scale', '0',
                             '--head-init-bias', '-2'])[0]
    model = build_student(args, 10)
    assert any(type(m).__name__ == 'DropBlock2d' for m in model.modules())
    assert model.fc.weight.abs().sum() == 0 and torch.all(model.fc.bias == -2)
    # --pretrained-path: a local file as the pretrained weights, the head adapted to the class count
    torch.manual_seed(0)
    source = timm.create_model('resnet10t', num_classes=5)
    path = str(tmp_path / 'weights.pth')
    torch.save(source.state_dict(), path)
    args = parse_train_args(['--data-dir', 'd', '--model', 'resnet10t', '--pretrained', '--pretrained-path', path])[0]
    model = build_student(args, 10)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight) and model.fc.out_features == 10
    assert parse_train_args(['--data-dir', 'd', '--drop-connect', '0.2'])[0].drop_path == 0.2  # timm's deprecated alias


def test_split_bn_gives_each_split_its_batchnorm():
    args = parse_train_args(['--data-dir', 'd', '--model', 'resnet10t', '--aug-splits', '3', '--split-bn',
                             '--jsd-loss'])[0]
    model = build_student(args, 10)
    split = [m for m in model.modules() if type(m).__name__ == 'SplitBatchNorm2d']
    assert split and all(len(m.aux_bn) == 2 for m in split)


def test_sync_bn_uses_timms_converter_and_keeps_the_activation():
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv3_small_050', num_classes=10).eval()  # fused BN + activation layers
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    by_torch = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert not torch.allclose(by_torch(x), before)  # torch's converter drops the fused activation
    converted = sync_batchnorm(model).eval()
    assert any(isinstance(m, SyncBatchNormAct) for m in converted.modules())
    assert torch.equal(converted(x), before)


def test_schedule_flags_reach_timms_scheduler():
    args = parse_train_args(['--data-dir', 'd', '--epochs', '10', '--lr-cycle-limit', '2', '--lr-cycle-mul', '1',
                             '--lr-k-decay', '2', '--lr-noise', '0.5', '--lr-noise-pct', '0.1',
                             '--warmup-epochs', '0'])[0]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    assert num_epochs == 20 and scheduler.cycle_limit == 2 and scheduler.k_decay == 2
    assert scheduler.noise_range_t == 5 and scheduler.noise_pct == 0.1


def test_dataset_flags_reach_timms_create_dataset(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(data_module, 'create_dataset', lambda name, **kw: seen.append((name, kw)) or [0, 1, 2])
    args = parse_train_args(['--data-dir', str(tmp_path), '--dataset', 'hfds/digits', '--dataset-download',
                             '--train-num-samples', '60', '--val-num-samples', '30', '--input-key', 'jpg',
                             '--target-key', 'cls', '--epoch-repeats', '2', '--in-chans', '1',
                             '--dataset-trust-remote-code'])[0]
    build_dataset(args, 'train', '--train-split', is_training=True)
    build_dataset(args, 'validation', '--val-split', is_training=False)
    (name, train), (_, val) = seen
    assert name == 'hfds/digits' and (train['download'], train['num_samples'], train['repeats']) == (True, 60, 2.0)
    assert (train['input_key'], train['target_key'], train['input_img_mode'], train['trust_remote_code']) == \
        ('jpg', 'cls', 'L', True)
    assert val['num_samples'] == 30 and 'repeats' not in val
    args = parse_train_args(['--data-dir', str(tmp_path), '--input-key', 'jpg'])[0]
    with pytest.raises(ConfigError, match='--input-key/--target-key: only for hfds/, wds/'):
        build_dataset(args, 'train', '--train-split', is_training=True)


def test_torchvision_dataset_without_download_is_one_line(train_script, train_argv, capsys, tmp_path):
    assert train_script.run_main(train_argv('--dataset', 'torch/cifar10', data=str(tmp_path))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--dataset torch/cifar10' in err and 'download=True' in err


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_run_with_ema_val_interval_recovery_images_and_opt_kwargs(train_script, train_argv, tmp_path):
    argv = train_argv('--mixup', '0.8', '--cutmix', '1.0', '--tokenmix', '--aug-repeats', '3', '--epochs', '3',
                      '--opt-kwargs', 'amsgrad=True', '--model-ema', '--model-ema-decay', '0.5', '--val-interval', '2',
                      '--recovery-interval', '3', '--save-images', '--log-interval', '4', '--checkpoint-hist', '3')
    assert train_script.run_main(argv) == 0
    run = tmp_path / 'out' / 'run'
    rows = _rows(run)
    assert [r['epoch'] for r in rows] == ['1', '2']  # --val-interval 2: epoch 0 skipped, the last one kept
    assert list(rows[0])[:8] == ['epoch', 'train_loss', 'train_img_per_sec', 'eval_top1', 'eval_top5', 'eval_loss',
                                 'eval_raw_top1', 'eval_raw_top5']
    best = _load(run / 'model_best.pth.tar')
    ranked = max(rows, key=lambda r: float(r['eval_top1']))  # timm: the EMA's metric ranks checkpoints
    assert best['metric'] == pytest.approx(float(ranked['eval_top1']))
    assert sorted(os.listdir(run)).count('checkpoint-0.pth.tar') == 0
    last = _load(run / 'last.pth.tar')
    assert all(group['amsgrad'] for group in last['optimizer']['param_groups'])  # --opt-kwargs reached adamw
    assert not glob.glob(str(run / 'recovery-*'))  # every 3 updates, each removed by the next or an epoch's save
    assert sorted(glob.glob(str(run / 'train-batch-*.jpg')))  # --save-images at log intervals


def test_wandb_offline_run_and_ema_on_cpu(train_script, train_argv, tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    argv = train_argv('--log-wandb', '--wandb-project', 'tokenmix-test', '--wandb-tags', 'a', 'b', '--epochs', '1',
                      '--model-ema', '--model-ema-force-cpu')
    assert train_script.run_main(argv) == 0
    run = tmp_path / 'out' / 'run'
    offline = glob.glob(str(run / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(offline) == 1 and os.path.getsize(offline[0]) > 0
    assert 'eval_raw_top1' not in _rows(run)[0]  # timm: an EMA forced to the CPU is not evaluated
    assert 'state_dict_ema' in _load(run / 'last.pth.tar')


def test_missing_wandb_is_one_line_before_anything_is_written(train_script, train_argv, capsys, tmp_path,
                                                             monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb raises ImportError
    assert train_script.run_main(train_argv('--log-wandb')) == 2
    assert capsys.readouterr().err.strip() == 'train.py: error: --log-wandb: wandb is not installed (pip install wandb)'
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('kind', ['file', 'read-only'])
def test_unwritable_output_is_one_line_before_anything_is_written(train_script, train_argv, capsys, tmp_path,
                                                                  monkeypatch, kind):
    target = tmp_path / 'out'
    if kind == 'file':
        target.write_text('not a folder')
        message = f"--output '{target}': '{target}' is a file, not a folder"
    else:  # root may write anywhere; a read-only file system answers access(W_OK) with False
        monkeypatch.setattr(os, 'access', lambda path, mode: False)
        message = f"--output '{target}': cannot write in '{tmp_path}'"
    assert train_script.run_main(train_argv()) == 2
    assert message in capsys.readouterr().err
    assert kind == 'file' or not target.exists()


def test_bad_device_module_is_one_line(train_script, train_argv, capsys):
    assert train_script.run_main(train_argv('--device-modules', 'no_such_backend')) == 2
    assert "--device-modules no_such_backend: No module named 'no_such_backend'" in capsys.readouterr().err


@pytest.mark.parametrize('config', ['timm_train_defaults_args.yaml', 'third_party_args.yaml'])
@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_timm_args_yaml_trains_an_epoch(train_script, tiny_data, tmp_path, config):
    """timm's own defaults and a third-party timm args.yaml, with only data, model, size, device and run length
    (--epochs 1, --cooldown-epochs 0: the third-party file asks for 300 + 10) given."""
    argv = ['-c', os.path.join(DATA, config), '--data-dir', tiny_data, *TINY_STUDENT, '-b', '8', '--epochs', '1',
            '--device', 'cpu', '-j', '0', '--output', str(tmp_path / 'out'), '--experiment', 'run',
            '--train-split', 'train', '--val-split', 'validation', '--cooldown-epochs', '0']
    with spy_forwards(is_vit) as student:
        assert train_script.run_main(argv) == 0
    run = tmp_path / 'out' / 'run'
    [row] = _rows(run)
    with open(os.path.join(DATA, config)) as f:
        recipe = yaml.safe_load(f)
    # the file's schedule reached timm's scheduler: epoch 0 of its 5 warmup epochs runs at its warmup_lr
    assert row['epoch'] == '0' and float(row['lr']) == pytest.approx(recipe['warmup_lr'], rel=1e-9)
    # the file's head (1000 classes, or the data's 10): a near-uniform predictor at that lr, loss ln(classes)
    assert float(row['train_loss']) == pytest.approx(math.log(recipe['num_classes'] or 10), abs=0.02)
    evaluated = 2 if recipe['model_ema'] else 1  # the EMA is evaluated too
    assert (student.images(training=True), student.images(training=False)) == (56, 30 * evaluated)  # 7 x 8; val
    assert student.changed(_load(run / 'last.pth.tar')['state_dict'])  # the optimiser stepped


def test_model_dtype_trains_a_bfloat16_student(train_script, train_argv, tmp_path):
    argv = train_argv('--model-dtype', 'bfloat16', '--epochs', '1', '--tokenmix', '--cutmix', '1.0')
    with spy_forwards(is_vit) as student:
        assert train_script.run_main(argv) == 0
    run = tmp_path / 'out' / 'run'
    weights = _load(run / 'last.pth.tar')['state_dict']
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    assert {call.input.dtype for call in student.calls} == {torch.bfloat16}  # mixed in float32, fed in bfloat16
    assert (student.images(training=True), student.images(training=False)) == (56, 30)
    assert student.changed(weights) and math.isfinite(float(_rows(run)[0]['train_loss']))


@pytest.mark.parametrize('flags, message', [
    (['--class-map', '/no/such/map.txt'], "--class-map '/no/such/map.txt': no such file"),
    (['--device', 'nosuch'], '--device nosuch: Expected one of cpu'),
    (['--pretrained', '--pretrained-path', '/no/such.pth'], "--pretrained-path '/no/such.pth': no such file"),
    (['--gp', 'nosuch'], 'pooling (or none) is supported. (check --gp / --model-kwargs)'),
    (['--model', 'resnet10t', '--img-size', '32', '--bn-eps', '0.1'], '--bn-eps: --model resnet10t does not take it'),
    (['--opt', 'sgd', '--momentum', '0'], '--opt sgd (--momentum 0.0, '),  # timm's sgd is Nesterov: torch refuses
] + ([] if torch.cuda.is_available() else [(['--device', 'cuda'], '--device cuda: no CUDA device here')]))
def test_bad_values_found_at_run_time_are_one_line(train_script, train_argv, capsys, tmp_path, flags, message):
    assert train_script.run_main(train_argv(*flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not (tmp_path / 'out').exists()


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_jsd_run_with_augmentation_splits(train_script, train_argv, tmp_path):
    """timm's AugMix recipe end to end: 3 views per image through the loop, JSD + CE loss (--split-bn is checked
    on a BN model above; the tiny ViT has none)."""
    argv = train_argv('--aug-splits', '3', '--jsd-loss', '--epochs', '1', '--log-interval', '7')
    assert train_script.run_main(argv) == 0
    log = (tmp_path / 'out' / 'run' / 'log.txt').read_text()
    assert 'train epoch 0 [7/7] loss ' in log  # 60 images, 8 a batch (24 views): the same 7 steps as without splits
    assert float(_rows(tmp_path / 'out' / 'run')[0]['train_loss']) > 0
