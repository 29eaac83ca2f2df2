"""benchmarks/attention_entropy.py: the class token's attention as timm computes it, its entropy, and the report
read from a run folder."""
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import timm
import torch

import models  # noqa: F401  (registers the tiny models)
from conftest import ROOT, load_script
from tokenmix_train.fidelity import load_demo_objects


@pytest.fixture(scope='module')
def tool():
    return load_script(os.path.join('benchmarks', 'attention_entropy.py'))


def test_entropy_of_uniform_and_one_hot(tool):
    weights = torch.stack([torch.full((65,), 1 / 65), torch.eye(65)[3]])
    assert torch.allclose(tool.entropy(weights), torch.tensor([math.log(65), 0.0]), atol=1e-6)


def test_object_focus_against_hand_counts(tool):
    """4 x 4 pixels, 2 px tokens in row-major order. Image 0: the object fills token 1 (top right) and half of token 2
    (bottom left): shares 0, 1, 0.5, 0, mean 0.375. Image 1: it fills token 2: shares 0, 0, 1, 0, mean 0.25."""
    objects = torch.zeros(2, 4, 4, dtype=torch.bool)
    objects[0, :2, 2:] = True
    objects[0, 2:, 0] = True
    objects[1, 2:, :2] = True
    on_token_1 = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])  # half on the class token, which does not count
    uniform = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    on_token_2 = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    weights = torch.stack([on_token_1, uniform, on_token_2])[:, None, None].expand(3, 2, 1, 5)  # 2 images, 1 head
    focus = tool.object_focus(weights, objects, patch_size=2)
    assert torch.allclose(focus, torch.tensor([(1 / 0.375 + 0) / 2, 1.0, (0.5 / 0.375 + 1 / 0.25) / 2]))
    two_heads = torch.stack([on_token_1, on_token_2])[None, None, :]  # 1 block x 1 image x 2 heads x 5
    assert torch.allclose(tool.object_focus(two_heads, objects[:1], 2), torch.tensor([(1 + 0.5) / 2 / 0.375]))


@pytest.mark.parametrize('qk_norm', [False, True])
def test_logits_give_timms_own_attention_weights(tool, qk_norm):
    """Softmax of the recomputed logits = the weights timm's unfused Attention applies (scale, q/k norms included)."""
    torch.manual_seed(0)
    model = timm.create_model('tokenmix_vit_tiny_convstem_64', img_size=32, patch_size=4, qk_norm=qk_norm).eval()
    for block in model.blocks:
        if qk_norm:  # trained norms are not the identity: make them matter
            for norm in (block.attn.q_norm, block.attn.k_norm):
                torch.nn.init.normal_(norm.weight, 1.0, 0.5)
                torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    images = torch.randn(3, 3, 32, 32)
    logits = tool.class_token_logits(model, images)
    seen = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0][:, :, 0]))
    with torch.no_grad():
        model.forward_features(images)
    assert logits.shape == (4, 3, 3, 65)
    assert torch.allclose(logits.softmax(-1), torch.stack(seen), atol=1e-6)
    assert not any(block.attn.qkv._forward_hooks for block in model.blocks)  # hooks removed


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_report_reads_the_run_and_rejects_a_cnn(tool, tiny_data, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(os.path.join(ROOT, 'configs', 'mini', 'vit_student.yaml'), run / 'args.yaml')
    torch.manual_seed(0)
    model = timm.create_model('tokenmix_vit_tiny_convstem_64', img_size=32, patch_size=4, qk_norm=True,
                              num_classes=10).eval()
    torch.save({'state_dict': model.state_dict()}, run / 'last.pth.tar')
    lines = tool.report(str(run), 'last.pth.tar', tool.measure(str(run), tiny_data, 20, 'last.pth.tar'))
    assert lines[0] == f'{run} (last.pth.tar, 20 images; uniform attention: 4.17 nats)'
    assert len(lines) == 7 and all(line.startswith(f'  block {i}: ') for i, line in enumerate(lines[1:5]))
    cfg = timm.data.resolve_data_config({}, model=model)
    images, _, objects = load_demo_objects(tiny_data, 'val', 20, cfg['mean'], cfg['std'])
    seen = []  # timm's own attention weights (unfused path), blocks x images x heads x tokens
    hooks = [block.attn.attn_drop.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0][:, :, 0]))
             for block in model.blocks]
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        model.forward_features(images)
    for hook in hooks:
        hook.remove()
    weights = torch.stack(seen)
    entropies = -(weights * weights.log()).sum(-1).mean(1)  # no weight is 0 in a random model's softmax
    ranges = (weights.log().amax(-1) - weights.log().amin(-1)).mean(1)  # log w differences = logit differences
    for i in range(4):
        assert lines[1 + i] == (f'  block {i}: class-token attention entropy per head '
                                + ' '.join(f'{v:.2f}' for v in entropies[i].tolist()) + '; logit range '
                                + ' '.join(f'{v:.1f}' for v in ranges[i].tolist()))
    with torch.no_grad():
        spread = model.forward_features(images)[:, 0].std(0).mean().item()
    assert lines[5] == f'  class-token feature spread over images: {spread:.3f}'
    focus = tool.object_focus(weights, objects, 4)
    assert lines[6] == '  class-token attention on the digit per block (1 = uniform): ' + ' '.join(
        f'{v:.2f}' for v in focus.tolist())

    shutil.copy(os.path.join(ROOT, 'configs', 'mini', 'cnn_teacher.yaml'), run / 'args.yaml')
    with pytest.raises(ValueError, match='is not a ViT that classifies from its class token'):
        tool.measure(str(run), tiny_data, 20, 'last.pth.tar')


@pytest.mark.slow
def test_table_over_seeds_with_paired_differences(tool, tiny_data, tmp_path, capsys):
    """--table: every finished run of a runs/ folder, then per row mean ± t interval and the paired difference."""
    runs = tmp_path / 'runs'
    for row in ('a_mixup_cutmix', 'b_mixup_cutmix_bce'):
        for seed in (0, 1, 2):
            run = runs / f'{row}-s{seed}'
            run.mkdir(parents=True)
            shutil.copy(os.path.join(ROOT, 'configs', 'mini', 'vit_student.yaml'), run / 'args.yaml')
            torch.manual_seed(seed + 10 * len(row))
            model = timm.create_model('tokenmix_vit_tiny_convstem_64', img_size=32, patch_size=4, qk_norm=True,
                                      num_classes=10)
            torch.save({'state_dict': model.state_dict()}, run / 'last.pth.tar')
            if seed < 2 or row == 'b_mixup_cutmix_bce':
                (run / 'validate.csv').write_text('model\n')  # finished; a-s2 is not: left out
    assert tool.main(['--table', str(runs), '--data-dir', tiny_data, '--images', '10']) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(str(runs)) for line in out) == 5
    finished = [('a_mixup_cutmix', 0), ('a_mixup_cutmix', 1)] + [('b_mixup_cutmix_bce', s) for s in (0, 1, 2)]
    focus = {(row, seed): tool.measure(str(runs / f'{row}-s{seed}'), tiny_data, 10, 'last.pth.tar')['focus']
             for row, seed in finished}
    a_last = [focus['a_mixup_cutmix', s][-1].item() for s in (0, 1)]
    b_last = [focus['b_mixup_cutmix_bce', s][-1].item() for s in (0, 1, 2)]
    b_mean = [focus['b_mixup_cutmix_bce', s].mean().item() for s in (0, 1, 2)]
    diff = [a - b for a, b in zip(a_last, b_last)]
    t2, t3 = 12.7062047, 4.30265273  # t(0.975) with 1 and 2 degrees of freedom

    def half(values, t):
        return t * statistics.stdev(values) / math.sqrt(len(values))

    a_row = out[-2].split(' | ')
    assert a_row[0] == '| (a) Mixup + CutMix, soft-target CE' and a_row[1] == '2'
    assert a_row[2] == f'{statistics.fmean(a_last):.2f} ± {half(a_last, t2):.2f}'
    assert a_row[3] == f'{statistics.fmean(diff):+.2f} ± {half(diff, t2):.2f}'
    a_mean = [focus['a_mixup_cutmix', s].mean().item() for s in (0, 1)]
    diff_mean = [a - b for a, b in zip(a_mean, b_mean)]
    assert a_row[4] == f'{statistics.fmean(a_mean):.2f} ± {half(a_mean, t2):.2f}'
    assert a_row[5] == f'{statistics.fmean(diff_mean):+.2f} ± {half(diff_mean, t2):.2f} |'
    b_row = out[-1].split(' | ')
    assert b_row[1:4] == ['3', f'{statistics.fmean(b_last):.2f} ± {half(b_last, t3):.2f}', '—']
    assert b_row[4] == f'{statistics.fmean(b_mean):.2f} ± {half(b_mean, t3):.2f}' and b_row[5] == '— |'
    assert out[-4].startswith('| method | seeds | on the digit, last block | vs (b) Mixup + CutMix, BCE |')


def test_missing_checkpoint_is_named(tool, tmp_path, capsys):
    (tmp_path / 'args.yaml').write_text('model: tokenmix_vit_tiny_convstem_64\n')
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(tmp_path), '--data-dir', str(tmp_path)])
    assert exit_info.value.code == 2 and f'{tmp_path}: no last.pth.tar' in capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['--table', 'RUNS', '--paired-to', 'z_row'], "argument --paired-to: invalid choice: 'z_row'"),
    (['RUN', '--paired-to', 'a_mixup_cutmix'], '--paired-to needs --table'),
    (['--table', 'NONE'], '--table NONE: no such folder'),
    (['--table', 'RUNS'], 'give RUN_DIR folders or --table with finished runs (validate.csv present)'),
    (['RUN', '--images', '0'], '--images must be >= 1, got 0'),
])
def test_bad_arguments_are_named(tool, tmp_path, capsys, argv, message):
    (tmp_path / 'RUNS').mkdir()
    (tmp_path / 'RUN').mkdir()
    argv = [str(tmp_path / a) if a in ('RUNS', 'RUN', 'NONE') else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*argv, '--data-dir', str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.replace('NONE', str(tmp_path / 'NONE')) in err


@pytest.mark.slow
def test_bad_data_dir_is_one_line(tool, tmp_path):
    """Through run_cli, as the script runs: the data folder is named, exit 2, no traceback."""
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(os.path.join(ROOT, 'configs', 'mini', 'vit_student.yaml'), run / 'args.yaml')
    model = timm.create_model('tokenmix_vit_tiny_convstem_64', img_size=32, patch_size=4, qk_norm=True, num_classes=10)
    torch.save({'state_dict': model.state_dict()}, run / 'last.pth.tar')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'attention_entropy.py'), str(run),
                           '--data-dir', str(tmp_path / 'nodata')], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith('attention_entropy.py: error: --data-dir: ')
    assert str(tmp_path / 'nodata') in proc.stderr and 'Traceback' not in proc.stderr
