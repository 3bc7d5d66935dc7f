"""Models for the experiments (Flax linen), with loaders for pretrained weights."""
