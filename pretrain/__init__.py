"""Pre-training pipeline for GPT-NeoX models: config, model, data, storage, checkpoint, metrics, loop."""
