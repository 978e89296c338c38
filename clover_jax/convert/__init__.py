"""Import PyTorch checkpoints (torchvision Swin3D, official Video Swin / Clover, HF BERT) into our params."""
