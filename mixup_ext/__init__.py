"""TokenMix augmentation: token-level masks, mixing and teacher-based targets.

Pure tensor code, usable from any timm training script in place of `timm.data.Mixup`.
"""
from .maps import area_resample, crop_map, overlap_matrix, own_map_from_topk, sample_maps, truncate_to_topk
from .masks import block_token_masks, masks_to_pixels, num_partner_tokens, random_token_masks, token_grid
from .targets import area_weights, mixed_targets, normalise_weights, own_class_maps, teacher_weights
from .tokenmix import TokenMix

__all__ = [
    'TokenMix', 'block_token_masks', 'random_token_masks', 'num_partner_tokens', 'token_grid', 'masks_to_pixels',
    'area_weights', 'teacher_weights', 'normalise_weights', 'mixed_targets', 'own_class_maps',
    'truncate_to_topk', 'own_map_from_topk', 'sample_maps', 'crop_map', 'overlap_matrix', 'area_resample',
]
