"""Teacher wrapper and tiny models registered with timm (importing this package registers them)."""
from . import tiny
from .checkpoint_io import (CheckpointError, LoadReport, check_state_dict, load_checkpoint_weights,
                            load_state_dict_file, read_checkpoint)
from .teacher import SUPPORTED_FAMILIES, Teacher, build_teacher

__all__ = [
    'Teacher', 'build_teacher', 'SUPPORTED_FAMILIES',
    'CheckpointError', 'read_checkpoint', 'load_state_dict_file', 'load_checkpoint_weights', 'check_state_dict',
    'LoadReport',
]
