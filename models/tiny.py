"""Tiny models for the demo and the tests, registered with timm (``import models`` then ``timm.create_model``).

* ``tokenmix_vit_tiny_p8_64``: a DeiT-style ViT student for 64 x 64 inputs with 8 x 8 patches, an 8 x 8 token grid
  (embed dim 96, depth 4, 3 heads, class-token pooling).
* ``tokenmix_vit_tiny_convstem_64``: the same ViT with a convolutional stem in place of the patchify convolution
  (stride-2 3 x 3 convolutions, Xiao et al. 2021, "Early convolutions help transformers see better"): the same token
  grid, an optimisation that leaves chance early on small data (the mini benchmark's student).
* ``tokenmix_cnn_teacher_64``: a half-width ResNet-10-T-like CNN with output stride 8 (dilated last two stages), so its
  last feature map is 8 x 8 at 64 x 64 input and lines up with the student's tokens. Its head is global average
  pooling then one linear layer, so its class activation maps average exactly to its logits.

All three default to 10 classes (the demo's digits) and take ``num_classes``; the ViTs take ``img_size``. They have no
pretrained weights: ``pretrained_cfg`` only carries the data config (input size, mean / std, crop).
"""
from typing import Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

__all__ = ['ConvStemPatchEmbed', 'tokenmix_vit_tiny_p8_64', 'tokenmix_vit_tiny_convstem_64', 'tokenmix_cnn_teacher_64']


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 64, 64), 'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'tokenmix_vit_tiny_p8_64': _cfg(first_conv='patch_embed.proj', classifier='head', fixed_input_size=True),
    'tokenmix_vit_tiny_convstem_64': _cfg(first_conv='patch_embed.proj.0', classifier='head', fixed_input_size=True),
    'tokenmix_cnn_teacher_64': _cfg(first_conv='conv1.0', classifier='fc', pool_size=(8, 8)),
})


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with a convolutional stem as its projection: log2(patch size) 3 x 3 stride-2 convolutions,
    each with batch norm and ReLU, widths doubling up to half the embedding width, then a 1 x 1 convolution to it.

    The token grid is the patchify embedding's, so token masks and occlusion patches line up as before; each token's
    receptive field reaches 3 pixels into the token above and the token to its left (patch 4: pixels 4j - 3 to 4j + 3
    for token column j). Only square power-of-two patches.
    """

    def __init__(self, img_size: Optional[Union[int, Tuple[int, int]]] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, **kwargs) -> None:
        # PatchEmbed sets the grid, the norm and the flags, and builds a patchify projection that is replaced below
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=bias,
                         device=device, dtype=dtype, **kwargs)
        size = self.patch_size[0]
        if self.patch_size[1] != size or size < 2 or size & (size - 1):
            raise ValueError(
                f'ConvStemPatchEmbed needs a square power-of-two patch size of at least 2, got {patch_size}')
        stages = size.bit_length() - 1
        dd = {'device': device, 'dtype': dtype}
        layers, width = [], in_chans
        for stage in range(stages):
            out = max(embed_dim // 2 ** (stages - stage), 1)
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False, **dd), nn.BatchNorm2d(out, **dd),
                       nn.ReLU(inplace=True)]
            width = out
        layers.append(nn.Conv2d(width, embed_dim, 1, bias=bias, **dd))
        self.proj = nn.Sequential(*layers)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """A new image size only: the stem's patch size is its number of stride-2 convolutions."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(f'ConvStemPatchEmbed cannot change its patch size {self.patch_size} to {patch_size}')
        super().set_input_size(img_size=img_size)


def _tiny_vit(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    """The tiny ViT shape shared by both students: 64 px input, 8 px tokens, dim 96, depth 4, 3 heads."""
    model_args = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls='getter'),
        **dict(model_args, **kwargs))


@register_model
def tokenmix_vit_tiny_p8_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT student: 64 px input, 8 px patches (8 x 8 tokens), dim 96, depth 4, 3 heads."""
    return _tiny_vit('tokenmix_vit_tiny_p8_64', pretrained, **kwargs)


@register_model
def tokenmix_vit_tiny_convstem_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT student with a conv stem: 64 px input, 8 px tokens (8 x 8 grid), dim 96, depth 4, 3 heads."""
    return _tiny_vit('tokenmix_vit_tiny_convstem_64', pretrained, **dict(embed_layer=ConvStemPatchEmbed, **kwargs))


@register_model
def tokenmix_cnn_teacher_64(pretrained: bool = False, **kwargs) -> ResNet:
    """CNN teacher: ResNet with one basic block per stage, widths 32-256, output stride 8 (8 x 8 map at 64 px)."""
    model_args = dict(
        block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=16, stem_type='deep_tiered',
        avg_down=True, output_stride=8)
    return build_model_with_cfg(ResNet, 'tokenmix_cnn_teacher_64', pretrained, **dict(model_args, **kwargs))
