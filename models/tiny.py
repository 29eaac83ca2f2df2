"""Tiny models for the demo and the tests, registered with timm (``import models`` then ``timm.create_model``).

* ``tokenmix_vit_tiny_p8_64``: a DeiT-style ViT student for 64 x 64 inputs with 8 x 8 patches, an 8 x 8 token grid
  (embed dim 96, depth 4, 3 heads, class-token pooling).
* ``tokenmix_cnn_teacher_64``: a half-width ResNet-10-T-like CNN with output stride 8 (dilated last two stages), so its
  last feature map is 8 x 8 at 64 x 64 input and lines up with the student's tokens. Its head is global average
  pooling then one linear layer, so its class activation maps average exactly to its logits.

Both default to 10 classes (the demo's digits) and take ``num_classes``; the ViT takes ``img_size``. They have no
pretrained weights: ``pretrained_cfg`` only carries the data config (input size, mean / std, crop).
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ['tokenmix_vit_tiny_p8_64', 'tokenmix_cnn_teacher_64']


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 64, 64), 'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'tokenmix_vit_tiny_p8_64': _cfg(first_conv='patch_embed.proj', classifier='head', fixed_input_size=True),
    'tokenmix_cnn_teacher_64': _cfg(first_conv='conv1.0', classifier='fc', pool_size=(8, 8)),
})


@register_model
def tokenmix_vit_tiny_p8_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT student: 64 px input, 8 px patches (8 x 8 tokens), dim 96, depth 4, 3 heads."""
    model_args = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3)
    return build_model_with_cfg(
        VisionTransformer, 'tokenmix_vit_tiny_p8_64', pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls='getter'),
        **dict(model_args, **kwargs))


@register_model
def tokenmix_cnn_teacher_64(pretrained: bool = False, **kwargs) -> ResNet:
    """CNN teacher: ResNet with one basic block per stage, widths 32-256, output stride 8 (8 x 8 map at 64 px)."""
    model_args = dict(
        block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=16, stem_type='deep_tiered',
        avg_down=True, output_stride=8)
    return build_model_with_cfg(ResNet, 'tokenmix_cnn_teacher_64', pretrained, **dict(model_args, **kwargs))
