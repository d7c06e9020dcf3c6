"""Named training configs (`test`, `production`, `production_8gpu`, ...) as typed dataclasses.

Pure data: no torch, no files. `pretrain.cli` turns `--config NAME --field-name VALUE` into one of these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model, with transformers' own field names; model_type picks the family (pretrain/model/), which
    maps these fields to its transformers config and ignores those it has no use for."""

    model_type: str = "gpt_neox"  # the model family: gpt_neox
    vocab_size: int = 50257
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 8192
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: int = 10000
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    tie_word_embeddings: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a run needs. Every field is a command-line flag: `--field-name VALUE`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    name: str = "custom"  # the named config this came from (set by get_config; not a flag)

    # Run
    run_name: str = ""  # empty: derived from the config name and start time; a resumed run keeps its own
    seed: int = 42
    resume: str = ""  # checkpoint folder name, or "latest"; empty: start fresh
    dry_run: bool = False  # build config and model on the meta device, print the plan, exit

    # Data
    data_dir: str = "data"
    data_bucket: str = ""  # URL to download shards from before training (gs://, s3://, az://, file://)
    max_files: int = 0  # 0: all shards
    seq_len: int = 1024
    eval_shards: int = 1  # without an eval split in dataset.json, the last N shards are held out for evaluation
    data_mixture: str = ""  # several datasets: NAME=URL:WEIGHT,... or a .yaml/.json file with sources and stages
    data_growth: bool = False  # on resume, add sources and shards the checkpoint's frozen data lacks from that step on
    # The sample order (fresh runs; a resumed run keeps the order frozen in its checkpoint): each shard is cut into
    # shard_chunks chunks, and each block of the order mixes block_chunks random chunks. Keep block_chunks several
    # times the global batch (in samples) when shards hold one stretch of the corpus each; each reader keeps up to
    # block_chunks + 2 shards open.
    block_chunks: int = 64
    shard_chunks: int = 8
    eval_steps: int = 0  # evaluate every N optimizer steps; 0: only at the end
    eval_batches: int = 8  # micro-batches per evaluation
    dataloader_num_workers: int = 4
    generate_sample_data: bool = False  # write a sample corpus into data_dir when it has no shards
    sample_corpus: str = "text"  # what that corpus is: text (stdlib docs, a trained BPE) | synthetic (a Markov chain)

    # Optimisation
    max_steps: int = 25000
    lr_decay_steps: int = 0  # 0: max_steps; set it to keep the schedule when stopping early with --max-steps
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    min_learning_rate_ratio: float = 0.1  # cosine decays to learning_rate * this
    warmup_steps: int = 500
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_consecutive_nonfinite: int = 5  # stop after this many skipped steps in a row

    # Performance
    mixed_precision: str = "bf16"  # bf16 | fp16 | no; on CPU only when cpu_mixed_precision is set
    cpu_mixed_precision: bool = False
    compile_model: bool = True
    compile_backend: str = "inductor"  # torch.compile backend; a backend that fails at the first step falls back to eager
    gradient_checkpointing: str = "auto"  # auto | true | false: recompute activations in backward (auto: if needed to fit)
    gpu_memory_gb: float = 0.0  # plan for this much memory per GPU; 0: measure the GPU (dry runs on a CPU: pass it)
    num_processes: int = 2  # the number of GPUs the config is sized for (informational; the launcher decides)
    peak_tflops_per_device: float = 0.0  # for MFU; 0: guess from the GPU name

    # Checkpoints
    output_dir: str = "checkpoints"
    save_steps: int = 1250
    save_every_minutes: float = 0.0  # also save when this much time passed since the last save; 0: off
    save_total_limit: int = 3  # local checkpoints kept
    checkpoint_bucket: str = ""  # URL to upload checkpoints to (gs://, s3://, az://, file://)
    remote_save_total_limit: int = 5  # remote checkpoints kept
    upload_timeout_seconds: float = 1800.0  # how long the end of training waits for pending uploads
    preemption_grace_seconds: float = 25.0  # budget for the emergency checkpoint and its upload on SIGTERM
    export_final_model: bool = True
    final_samples: int = 3  # lines the exported model generates at the end (when the data has a tokenizer); 0: off

    # Storage
    gcs_credentials: str = ""  # path to a service-account JSON; else the default credential chain
    gcp_project: str = ""
    s3_endpoint_url: str = ""  # for S3-compatible stores
    storage_max_retries: int = 5
    storage_retry_backoff_seconds: float = 1.0

    # Logging
    logging_dir: str = "logs"
    logging_steps: int = 250
    sync_logs_every_minutes: float = 10.0  # copy logs to the checkpoint bucket; 0: off
    wandb: bool = False
    wandb_project: str = "pretrain"
    wandb_mode: str = "online"  # online | offline

    def effective_lr_decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps


TEST_MODEL = ModelConfig(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=256,
)

CONFIGS: dict[str, TrainingConfig] = {
    "test": TrainingConfig(
        model=TEST_MODEL,
        seq_len=128,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_processes=1,
        max_steps=150,
        save_steps=50,
        logging_steps=10,
        eval_steps=50,
        eval_batches=4,
        warmup_steps=15,
        learning_rate=3e-3,
        weight_decay=0.1,
        dataloader_num_workers=0,
        mixed_precision="no",
        compile_model=False,
        generate_sample_data=True,
        checkpoint_bucket="bucket",  # a local folder standing in for the cloud bucket, so the default run uploads too
        sync_logs_every_minutes=0.0,
    ),
    "production": TrainingConfig(),
    "production_8gpu": TrainingConfig(
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        num_processes=8,
        max_steps=590625,
        save_steps=20000,
        logging_steps=3000,
        warmup_steps=11812,
        learning_rate=3e-4,
        dataloader_num_workers=6,
    ),
}


def get_config(name: str) -> TrainingConfig:
    if name not in CONFIGS:
        raise ValueError(f"--config {name!r} is not a known config; choose one of: {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], name=name)


def as_dict(config: TrainingConfig) -> dict:
    """Plain JSON-able values, for checkpoints and W&B."""
    return dataclasses.asdict(config)


def with_changes(config: TrainingConfig, **changes) -> TrainingConfig:
    """Copy of `config` with top-level or model fields replaced (model fields are routed to `config.model`)."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_changes = {k: v for k, v in changes.items() if k in model_fields}
    top_changes = {k: v for k, v in changes.items() if k not in model_fields}
    if model_changes:
        top_changes["model"] = dataclasses.replace(config.model, **model_changes)
    return dataclasses.replace(config, **top_changes)
