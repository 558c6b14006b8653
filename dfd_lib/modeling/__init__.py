"""Models and their training (notebook 04): backbones by name, experts and their mixture, the three
losses, checkpoints (ours and the released format), the training loop on accelerate's state,
metrics, robustness and notebook 04's comparison."""
