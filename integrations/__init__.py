"""Adapters that put BlossomAttention into existing models (installed as
blossom_ops.integrations). Each adapter has a patch_* and an unpatch_* function."""
