"""Training ChunkLLM's adapters on a frozen backbone: data, losses, the train step, checkpoints."""
