"""Matched controls: every TokenMix recipe has a Mixup+CutMix run that differs from it only in the mixer, and every
table script that trains the recipe trains that control too."""
import glob
import os
import shlex
import subprocess
from typing import Dict, List

import pytest

from tokenmix_train.args import parse_train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'imagenet', '*.yaml')))
TABLE_SCRIPTS = ('deit_main_table.sh', 'deit_small_400ep.sh', 'ablation_mask_type.sh', 'ablation_target.sh',
                 'ablation_teacher.sh', 'swin_tiny_table.sh')
# The only keys in which a control may differ from its TokenMix recipe: the mixer and its teacher.
MIXER_KEYS = frozenset({
    'tokenmix', 'tokenmix_mask', 'tokenmix_patch_size', 'tokenmix_min_tokens', 'tokenmix_lam', 'tokenmix_target',
    'tokenmix_target_norm', 'teacher_model', 'teacher_pretrained', 'teacher_amp', 'teacher_topk',
})
EXPECTED_CONTROLS = {
    'deit_tiny_tokenmix_300ep': 'deit_tiny_cutmix_mixup_bce_300ep',
    'deit_small_tokenmix_300ep': 'deit_small_cutmix_mixup_bce_300ep',
    'deit_small_tokenmix_area_300ep': 'deit_small_cutmix_mixup_bce_300ep',
    'deit_small_tokenmix_random_300ep': 'deit_small_cutmix_mixup_bce_300ep',
    'deit_small_tokenmix_stored_maps_300ep': 'deit_small_cutmix_mixup_bce_300ep',
    'deit_small_tokenmix_weak_teacher_300ep': 'deit_small_cutmix_mixup_bce_300ep',
    'deit_base_tokenmix_300ep': 'deit_base_cutmix_mixup_bce_300ep',
    'deit_small_tokenmix_400ep': 'deit_small_cutmix_mixup_bce_400ep',
    'swin_tiny_tokenmix_300ep': 'swin_tiny_cutmix_mixup_bce_300ep',
}


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _settings(name: str) -> Dict[str, object]:
    """The parsed train arguments of a recipe, without the path of its own config file."""
    path = os.path.join(ROOT, 'configs', 'imagenet', name + '.yaml')
    args = vars(parse_train_args(['-c', path, '--data-dir', 'd'])[0])
    return {k: v for k, v in args.items() if k != 'config'}


SETTINGS = {_name(c): _settings(_name(c)) for c in CONFIGS}
TOKENMIX = sorted(n for n, s in SETTINGS.items() if s['tokenmix'])


def _differing_keys(a: Dict[str, object], b: Dict[str, object]) -> set:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_every_tokenmix_recipe_is_listed():
    assert TOKENMIX == sorted(EXPECTED_CONTROLS)


@pytest.mark.parametrize('recipe', TOKENMIX)
def test_control_differs_only_in_the_mixer(recipe):
    controls = [n for n, s in SETTINGS.items()
                if not s['tokenmix'] and _differing_keys(SETTINGS[recipe], s) <= MIXER_KEYS]
    assert controls == [EXPECTED_CONTROLS[recipe]]
    control = SETTINGS[controls[0]]
    assert 'tokenmix' in _differing_keys(SETTINGS[recipe], control)
    # Mixup + CutMix with the recipe's alphas and switch, no teacher
    assert not control['teacher_model'] and not control['teacher_pretrained']
    assert (control['mixup'], control['cutmix'], control['mixup_switch_prob']) == (0.8, 1.0, 0.5)
    # what the published baselines differ in is the same here: loss, repeated augmentation, length, EMA, order
    for key in ('model', 'bce_loss', 'aug_repeats', 'epochs', 'cooldown_epochs', 'model_ema', 'model_ema_decay',
                'aug_order'):
        assert control[key] == SETTINGS[recipe][key], key


def test_paper_rows_take_the_authors_augmentation_order_and_published_baselines_timms():
    """The TokenMix rows and their controls flip and RandAugment the whole image before the crop, as the authors'
    code; DeiT's and Swin's published baselines keep timm's order, with which they were run."""
    authors = set(EXPECTED_CONTROLS) | set(EXPECTED_CONTROLS.values())
    assert {n for n, s in SETTINGS.items() if s['aug_order'] == 'authors'} == authors
    assert {n for n, s in SETTINGS.items() if s['aug_order'] == 'timm'} == {
        'deit_tiny_cutmix_mixup_300ep', 'deit_small_cutmix_mixup_300ep', 'deit_base_cutmix_mixup_300ep',
        'deit_small_cutmix_mixup_400ep', 'swin_tiny_cutmix_mixup_300ep'}


def _trained_rows(script: str) -> List[str]:
    """The rows a table script trains, in order, from its DRY_RUN=1 output."""
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', script), '8', '/data/in1k', '/runs'],
                          capture_output=True, text=True, env={**os.environ, 'DRY_RUN': '1', 'PYTHON': 'py'})
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith('+ ')]
    return [c[c.index('--experiment') + 1] for c in commands if '--experiment' in c]


def test_every_table_script_trains_the_control_beside_its_tokenmix_rows():
    trained = {script: _trained_rows(script) for script in TABLE_SCRIPTS}
    assert trained['deit_main_table.sh'] == [
        'deit_tiny_cutmix_mixup_300ep', 'deit_tiny_cutmix_mixup_bce_300ep', 'deit_tiny_tokenmix_300ep',
        'deit_small_cutmix_mixup_300ep', 'deit_small_cutmix_mixup_bce_300ep', 'deit_small_tokenmix_300ep',
        'deit_base_cutmix_mixup_300ep', 'deit_base_cutmix_mixup_bce_300ep', 'deit_base_tokenmix_300ep']
    assert trained['swin_tiny_table.sh'] == [
        'swin_tiny_cutmix_mixup_300ep', 'swin_tiny_cutmix_mixup_bce_300ep', 'swin_tiny_tokenmix_300ep']
    for script, rows in trained.items():
        tokenmix_rows = [r for r in rows if r in EXPECTED_CONTROLS]
        assert tokenmix_rows, script
        for row in tokenmix_rows:
            assert EXPECTED_CONTROLS[row] in rows, (script, row)
    assert {r for rows in trained.values() for r in rows} >= set(EXPECTED_CONTROLS) | set(EXPECTED_CONTROLS.values())
