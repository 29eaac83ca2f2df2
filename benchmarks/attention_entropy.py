#!/usr/bin/env python3
"""Where does a ViT run's class token look? Its attention entropy per block and head, and its attention on the digit.

A mini-table run that sits at the prior's loss (docs/results.md) can be told from a slow one here: at chance the
class token of a collapsed run attends to a few tokens whatever the image (entropy far below ln(tokens + 1), the
uniform attention of an untrained model, and below a training run's), so its features hardly vary between images.
Prints, per run folder (train.py's output, read through its args.yaml so the model is built as trained): each head's
entropy in nats and the range of its logits (largest minus smallest, mean over images), the uniform entropy, and the
spread of the final class-token features over images; and per block the class token's attention on the digit
relative to uniform attention (1: no preference, 2: twice the uniform share), from the data's pixel masks: the
paper's "more focus on the foreground", measured rather than pictured.

    python benchmarks/attention_entropy.py output/mini_table/runs/a_mixup_cutmix-s0 --data-dir output/mini_table/data
    python benchmarks/attention_entropy.py --table output/mini_table/runs --data-dir output/mini_table/data \\
        --images 1000 --checkpoint model_best.pth.tar     # every run, then the rows' digit focus with intervals
"""
import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the packages of this checkout, also where they are not pip-installed (the GPU machine)
    sys.path.insert(0, ROOT)

from models import load_checkpoint_weights  # noqa: E402
from tokenmix_train.distributed import run_cli  # noqa: E402
from tokenmix_train.errors import ConfigError  # noqa: E402
from tokenmix_train.fidelity import load_demo_objects  # noqa: E402
from tokenmix_train.mini_stats import difference_cell, interval_cell, paired_difference  # noqa: E402
from tokenmix_train.mini_table import ROWS, find_runs, read_run_args  # noqa: E402
from tokenmix_train.model import build_student, patch_size_of  # noqa: E402


@torch.no_grad()
def class_token_logits(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The class token's attention logits (before the softmax), blocks x images x heads x tokens, recomputed from
    each block's q and k as timm's Attention does (its fused kernel does not return them)."""
    qkv = []
    hooks = [block.attn.qkv.register_forward_hook(lambda mod, inp, out: qkv.append(out)) for block in model.blocks]
    try:
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for block, out in zip(model.blocks, qkv):
        attn = block.attn
        batch, tokens, _ = out.shape
        q, k, _ = out.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rows.append(((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1))[:, :, 0])
    return torch.stack(rows)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension (0 log 0 = 0)."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1)


def object_focus(weights: torch.Tensor, objects: torch.Tensor, patch_size: int, prefix_tokens: int = 1) -> torch.Tensor:
    """Per block, the class token's attention on the object relative to uniform attention over the patch tokens.

    weights: blocks x images x heads x (prefix + patch tokens) attention weights; objects: bool images x H x W pixel
    masks. For each image and head, the object share (fraction of object pixels, per token) averaged with the
    attention weights over the patch tokens, divided by its plain average; then the mean over images and heads.
    """
    shares = F.avg_pool2d(objects[:, None].float(), patch_size).flatten(1)  # images x patch tokens
    patches = weights[..., prefix_tokens:]
    on_object = (patches * shares[None, :, None]).sum(-1) / patches.sum(-1)
    return (on_object / shares.mean(-1)[None, :, None]).mean((1, 2))


def feature_spread(model: VisionTransformer, images: torch.Tensor) -> float:
    """Standard deviation over images of the normalised class-token features, averaged over channels: near 0 when
    the model sees every image alike."""
    with torch.no_grad():
        return model.forward_features(images)[:, 0].std(0).mean().item()


def measure(run_dir: str, data_dir: str, images: int, checkpoint: str) -> Dict[str, torch.Tensor]:
    """One run's attention figures over the first `images` demo val images: per block and head the entropy and the
    logit range (means over images), the feature spread, and per block the attention on the digit."""
    args = read_run_args(run_dir, data_dir)
    model = build_student(args, args.num_classes or 10)
    if not isinstance(model, VisionTransformer) or model.global_pool != 'token':
        raise ConfigError(f'{run_dir}: {args.model} is not a ViT that classifies from its class token')
    if any(type(block.attn) is not Attention for block in model.blocks):
        raise ConfigError(f'{run_dir}: {args.model} has attention layers other than timm\'s Attention')
    load_checkpoint_weights(model, os.path.join(run_dir, checkpoint))
    model.eval()
    config = resolve_data_config(vars(args), model=model)
    try:
        x, _, objects = load_demo_objects(data_dir, 'val', images, config['mean'], config['std'])
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f'--data-dir: {e}') from None
    logits = class_token_logits(model, x)
    weights = logits.softmax(-1)
    return {'images': torch.tensor(len(x)), 'uniform': torch.tensor(float(weights.shape[-1])).log(),
            'entropy': entropy(weights).mean(1), 'logit_range': (logits.amax(-1) - logits.amin(-1)).mean(1),
            'spread': torch.tensor(feature_spread(model, x)),
            'focus': object_focus(weights, objects, patch_size_of(model), model.num_prefix_tokens)}


def report(run_dir: str, checkpoint: str, figures: Dict[str, torch.Tensor]) -> List[str]:
    """One run's lines: entropy and logit range per block (one value per head), feature spread, digit focus."""
    lines = [f'{run_dir} ({checkpoint}, {int(figures["images"])} images; '
             f'uniform attention: {figures["uniform"].item():.2f} nats)']
    lines += [f'  block {i}: class-token attention entropy per head ' + ' '.join(f'{v:.2f}' for v in row.tolist())
              + '; logit range ' + ' '.join(f'{v:.1f}' for v in logit_range.tolist())
              for i, (row, logit_range) in enumerate(zip(figures['entropy'], figures['logit_range']))]
    lines.append(f'  class-token feature spread over images: {figures["spread"].item():.3f}')
    lines.append('  class-token attention on the digit per block (1 = uniform): '
                 + ' '.join(f'{v:.2f}' for v in figures['focus'].tolist()))
    return lines


def focus_table(focus: Dict[str, Dict[int, torch.Tensor]], base: str) -> str:
    """Markdown: per mini-table row, the attention on the digit (last block; mean over blocks) as mean ± 95% interval
    over seeds, and its paired difference to row `base` over the seeds both have."""
    def cells(values: Dict[int, float], reference: Optional[Dict[int, float]]) -> List[str]:
        diff = paired_difference(values, reference) if reference else None
        return [interval_cell(list(values.values()), 2), difference_cell(diff, 2)]

    label = ROWS.get(base, base)
    lines = [f'| method | seeds | on the digit, last block | vs {label} | mean over blocks | vs {label} |',
             '|---|---|---|---|---|---|']
    for row, seeds in focus.items():
        last = {seed: value[-1].item() for seed, value in seeds.items()}
        mean = {seed: value.mean().item() for seed, value in seeds.items()}
        base_seeds = focus.get(base) if row != base else None
        row_cells = cells(last, base_seeds and {s: v[-1].item() for s, v in base_seeds.items()})
        row_cells += cells(mean, base_seeds and {s: v.mean().item() for s, v in base_seeds.items()})
        lines.append(f'| {ROWS.get(row, row)} | {len(seeds)} | ' + ' | '.join(row_cells) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='*', metavar='RUN_DIR', help="train.py output folders (args.yaml inside)")
    parser.add_argument('--table', default='', metavar='RUNS_DIR',
                        help="also every finished run of a mini table's runs/ folder, then a table over seeds")
    parser.add_argument('--paired-to', default=None, choices=list(ROWS), metavar='ROW',
                        help='row the --table gives paired differences to (default: b_mixup_cutmix_bce)')
    parser.add_argument('--data-dir', required=True, help='demo data written by tools/make_demo_data.py')
    parser.add_argument('--images', type=int, default=200, help='val images (default: 200)')
    parser.add_argument('--checkpoint', default='last.pth.tar', help='file in each run folder (default: last)')
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f'--images must be >= 1, got {args.images}')
    if args.paired_to and not args.table:
        parser.error('--paired-to needs --table')
    if args.table and not os.path.isdir(args.table):
        parser.error(f'--table {args.table}: no such folder')
    table_runs = find_runs(args.table) if args.table else {}
    # each run once, in the order given, then the table's in row and seed order
    runs = list(dict.fromkeys([*args.runs, *(path for seeds in table_runs.values() for path in seeds.values())]))
    if not runs:
        parser.error('give RUN_DIR folders or --table with finished runs (validate.csv present)')
    for run in runs:
        for name in ('args.yaml', args.checkpoint):
            if not os.path.isfile(os.path.join(run, name)):
                parser.error(f'{run}: no {name}')
    focus = {}
    for run in runs:
        figures = measure(run, args.data_dir, args.images, args.checkpoint)
        print('\n'.join(report(run, args.checkpoint, figures)))
        focus[run] = figures['focus']
    if table_runs:
        print(focus_table({row: {seed: focus[path] for seed, path in seeds.items()}
                           for row, seeds in table_runs.items()}, args.paired_to or 'b_mixup_cutmix_bce'))
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, 'attention_entropy.py'))
