"""benchmarks/attention_entropy.py: the class token's attention as timm computes it, its entropy, and the report
read from a run folder."""
import math
import os
import shutil
import statistics

import pytest
import timm
import torch

import models  # noqa: F401  (registers the tiny models)
from conftest import ROOT, load_script
from tokenmix.fidelity import load_demo_objects


@pytest.fixture(scope='module')
def tool():
    return load_script(os.path.join('benchmarks', 'attention_entropy.py'))


def test_entropy_of_uniform_and_one_hot(tool):
    weights = torch.stack([torch.full((65,), 1 / 65), torch.eye(65)[3]])
    assert torch.allclose(tool.entropy(weights), torch.tensor([math.log(65), 0.0]), atol=1e-6)


def test_object_focus_against_hand_counts(tool):
    """4 x 4 pixels, 2 px tokens: the object fills token 0 and half of token 3 (shares 1, 0, 0, 0.5; mean 0.375)."""
    objects = torch.zeros(1, 4, 4, dtype=torch.bool)
    objects[0, :2, :2] = True
    objects[0, 2:, 2] = True
    on_token_0 = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])  # half on the class token, which does not count
    uniform = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    on_token_3 = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    weights = torch.stack([on_token_0, uniform, on_token_3])[:, None, None]  # 3 blocks x 1 image x 1 head x 5
    focus = tool.object_focus(weights, objects, patch_size=2)
    assert torch.allclose(focus, torch.tensor([1 / 0.375, 1.0, 0.5 / 0.375]))
    two_heads = torch.stack([on_token_0, on_token_3])[None, None]  # 1 block x 1 image x 2 heads x 5
    assert torch.allclose(tool.object_focus(two_heads, objects, 2), torch.tensor([(1 + 0.5) / 2 / 0.375]))


@pytest.mark.parametrize('qk_norm', [False, True])
def test_logits_give_timms_own_attention_weights(tool, qk_norm):
    """Softmax of the recomputed logits = the weights timm's unfused Attention applies (scale, q/k norms included)."""
    torch.manual_seed(0)
    model = timm.create_model('tokenmix_vit_tiny_convstem_64', img_size=32, patch_size=4, qk_norm=qk_norm).eval()
    for block in model.blocks:
        if qk_norm:  # trained norms are not the identity: make them matter
            torch.nn.init.normal_(block.attn.q_norm.weight, 1.0, 0.5)
            torch.nn.init.normal_(block.attn.k_norm.bias, 0.0, 0.5)
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
    weights = tool.class_token_logits(model, images).softmax(-1)
    expected = tool.entropy(weights).mean(1)[0]
    assert lines[1].split('per head ')[1].split(';')[0] == ' '.join(f'{v:.2f}' for v in expected.tolist())
    with torch.no_grad():
        spread = model.forward_features(images)[:, 0].std(0).mean().item()
    assert lines[5] == f'  class-token feature spread over images: {spread:.3f}'
    focus = tool.object_focus(weights, objects, 4)
    assert lines[6] == '  class-token attention on the digit per block (1 = uniform): ' + ' '.join(
        f'{v:.2f}' for v in focus.tolist())

    shutil.copy(os.path.join(ROOT, 'configs', 'mini', 'cnn_teacher.yaml'), run / 'args.yaml')
    with pytest.raises(ValueError, match='is not a ViT with a class token'):
        tool.measure(str(run), tiny_data, 20, 'last.pth.tar')


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
    half = lambda v, t: t * statistics.stdev(v) / math.sqrt(len(v))  # noqa: E731
    a_row = out[-2].split(' | ')
    assert a_row[0] == '| (a) Mixup + CutMix, soft-target CE' and a_row[1] == '2'
    assert a_row[2] == f'{statistics.fmean(a_last):.2f} ± {half(a_last, t2):.2f}'
    assert a_row[3] == f'{statistics.fmean(diff):+.2f} ± {half(diff, t2):.2f}'
    b_row = out[-1].split(' | ')
    assert b_row[1:4] == ['3', f'{statistics.fmean(b_last):.2f} ± {half(b_last, t3):.2f}', '—']
    assert b_row[4] == f'{statistics.fmean(b_mean):.2f} ± {half(b_mean, t3):.2f}' and b_row[5] == '— |'
    assert out[-4].startswith('| method | seeds | on the digit, last block | vs (b) Mixup + CutMix, BCE |')


def test_missing_checkpoint_is_named(tool, tmp_path, capsys):
    (tmp_path / 'args.yaml').write_text('model: tokenmix_vit_tiny_convstem_64\n')
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(tmp_path), '--data-dir', str(tmp_path)])
    assert exit_info.value.code == 2 and f'{tmp_path}: no last.pth.tar' in capsys.readouterr().err
