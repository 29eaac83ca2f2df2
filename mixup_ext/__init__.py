"""TokenMix augmentation: token-level masks, mixing and teacher-based targets."""
