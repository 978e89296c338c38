"""Flax modules of the Clover network: Swin3D video encoder, BERT text and fusion encoders, heads."""
