"""Pre-training pipeline for language models on preemptible GPUs: the rooms are the subpackages (model, data, prepare,
checkpoint, launch, storage) and the loop, evaluation, metrics, optimizer, agreement and memory plan beside them."""
