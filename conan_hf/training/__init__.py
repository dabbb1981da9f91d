"""What the training stages share and a user's own Trainer can reuse: configuration, checkpoints and resume,
distributed runtime, model loading, the soft-mask schedule callback and streamed-data training."""
