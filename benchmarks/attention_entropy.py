#!/usr/bin/env python3
"""Has a ViT run's attention collapsed? The class token's attention entropy per block and head, over demo val images.

A mini-table run that sits at the prior's loss (docs/results.md) can be told from a slow one here: at chance the
class token of a collapsed run attends to a few tokens whatever the image (entropy far below ln(tokens + 1), the
uniform attention of an untrained model, and below a training run's), so its features hardly vary between images.
Prints, per run folder (train.py's output, read through its args.yaml so the model is built as trained): each head's
entropy in nats and the range of its logits (largest minus smallest, mean over images), the uniform entropy, and the
spread of the final class-token features over images.

    python benchmarks/attention_entropy.py output/mini_table/runs/a_mixup_cutmix-s0 --data-dir output/mini_table/data
"""
import argparse
import os
import sys
from typing import List, Optional, Sequence

import torch
from timm.data import resolve_data_config
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import load_checkpoint_weights  # noqa: E402
from tokenmix.args import parse_args as parse_train_args  # noqa: E402
from tokenmix.fidelity import load_demo_objects  # noqa: E402
from tokenmix.model import build_student  # noqa: E402


def class_token_logits(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The class token's attention logits (before the softmax), blocks x images x heads x tokens, recomputed from
    each block's q and k as timm's Attention does (its fused kernel does not return them)."""
    qkv = []
    hooks = [block.attn.qkv.register_forward_hook(lambda mod, inp, out: qkv.append(out)) for block in model.blocks]
    try:
        with torch.no_grad():
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


def feature_spread(model: VisionTransformer, images: torch.Tensor) -> float:
    """Standard deviation over images of the normalised class-token features, averaged over channels: near 0 when
    the model sees every image alike."""
    with torch.no_grad():
        return model.forward_features(images)[:, 0].std(0).mean().item()


def report(run_dir: str, data_dir: str, images: int, checkpoint: str) -> List[str]:
    """One run's lines: entropy per block (one value per head, mean over images) and the feature spread."""
    args = parse_train_args(['-c', os.path.join(run_dir, 'args.yaml'), '--data-dir', data_dir])
    model = build_student(args, args.num_classes or 10)
    if not isinstance(model, VisionTransformer) or not model.has_class_token:
        raise ValueError(f'{run_dir}: {args.model} is not a ViT with a class token')
    load_checkpoint_weights(model, os.path.join(run_dir, checkpoint))
    model.eval()
    config = resolve_data_config(vars(args), model=model)
    x, _, _ = load_demo_objects(data_dir, 'val', images, config['mean'], config['std'])
    logits = class_token_logits(model, x)
    weights = logits.softmax(-1)
    per_head = entropy(weights).mean(1)
    spread = (logits.amax(-1) - logits.amin(-1)).mean(1)  # range of the logits, per block and head
    uniform = torch.log(torch.tensor(float(weights.shape[-1]))).item()
    lines = [f'{run_dir} ({checkpoint}, {len(x)} images; uniform attention: {uniform:.2f} nats)']
    lines += [f'  block {i}: class-token attention entropy per head ' + ' '.join(f'{v:.2f}' for v in row.tolist())
              + '; logit range ' + ' '.join(f'{v:.1f}' for v in logit_range.tolist())
              for i, (row, logit_range) in enumerate(zip(per_head, spread))]
    lines.append(f'  class-token feature spread over images: {feature_spread(model, x):.3f}')
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+', metavar='RUN_DIR', help="train.py output folders (args.yaml inside)")
    parser.add_argument('--data-dir', required=True, help='demo data written by tools/make_demo_data.py')
    parser.add_argument('--images', type=int, default=200, help='val images (default: 200)')
    parser.add_argument('--checkpoint', default='last.pth.tar', help='file in each run folder (default: last)')
    args = parser.parse_args(argv)
    for run in args.runs:
        for name in ('args.yaml', args.checkpoint):
            if not os.path.isfile(os.path.join(run, name)):
                parser.error(f'{run}: no {name}')
    for run in args.runs:
        print('\n'.join(report(run, args.data_dir, args.images, args.checkpoint)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
