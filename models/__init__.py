"""Teacher wrapper and tiny models registered with timm."""
