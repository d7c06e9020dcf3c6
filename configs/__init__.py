"""Named training configs (`test`, `production`, `production_8gpu`, ...) as typed dataclasses.

Pure data: no torch, no files. `pretrain.cli` turns `--config NAME --field-name VALUE` into one of these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model, with transformers' own field names; model_type picks the family (pretrain/model/), which
    maps these fields to its transformers config. A field left unset (None) takes the family's default; a field
    marked "gpt_neox only" or "llama only" must keep its default under the other family (the CLI refuses it)."""

    model_type: str = "gpt_neox"  # the model family: gpt_neox | llama
    size_preset: str = ""  # a named block shape of the family (README, Model families); sets layers, width, heads, FFN
    target_params: str = ""  # size the model to about N non-embedding parameters (350M, 1.2B); rule: model/sizing.py
    vocab_size: int = 50257
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # llama only: K/V heads of grouped-query attention; unset: one per head
    intermediate_size: int = 8192
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25  # gpt_neox only: share of each head's dimensions that get rotary positions
    rotary_emb_base: int = 10000  # rotary base (llama's rope_theta)
    use_parallel_residual: bool = True  # gpt_neox only
    hidden_act: str | None = None  # unset: the family's (gpt_neox gelu, llama silu)
    tie_word_embeddings: bool = False
    hidden_dropout: float = 0.0  # gpt_neox only
    attention_dropout: float = 0.0
    layer_norm_eps: float | None = None  # unset: the family's (gpt_neox LayerNorm 1e-5, llama RMSNorm 1e-6)
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
    init_from: str = ""  # a Hugging Face model folder (config.json, safetensors) whose weights start a new run
    # A cooldown branch: a new run (its own --run-name, --output-dir, --checkpoint-bucket) that starts from a
    # stable-phase checkpoint of a wsd run (weights, optimizer, data position) and decays the rate to the floor
    # over cooldown_steps, ending at that checkpoint's step + cooldown_steps; the main run is not touched.
    cooldown_from: str = ""  # the checkpoint folder, local or in a bucket (gs://.../checkpoint-epoch0-step5000-files8)
    cooldown_steps: int = 0  # length of the cooldown branch's decay

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
    lr_schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | linear; each with linear warmup
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    min_learning_rate_ratio: float = 0.1  # the schedule decays to learning_rate * this
    warmup_steps: int = 500
    wsd_decay_fraction: float = 0.2  # wsd: the share of the decay steps spent decaying, at the end
    wsd_decay_shape: str = "1-sqrt"  # wsd and cooldown branches: how the rate falls: 1-sqrt | linear | cosine
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    z_loss_coefficient: float = 0.0  # adds this * mean(logsumexp(logits)^2) to the training loss (PaLM); 0: off
    max_consecutive_nonfinite: int = 5  # stop after this many skipped steps in a row
    ema_decay: float = 0.0  # keep an exponential moving average of the weights with this decay (e.g. 0.999); 0: off

    # Loss spikes (pretrain/spikes.py): a step whose loss (or gradient norm) is far above the running window of the
    # steps before it. What happens then: warn (log and count it), skip (its update is not applied), rollback (the
    # last checkpoint from before it is restored in this process and the samples that led to it are skipped).
    on_loss_spike: str = "warn"  # warn | skip | rollback
    loss_spike_window: int = 50  # steps in the running window; detection starts once it is full
    loss_spike_sigmas: float = 6.0  # a loss this many standard deviations above the window mean is a spike; 0: off
    grad_spike_sigmas: float = 0.0  # the same for the gradient norm; 0: off
    loss_spike_skip_steps: int = 1  # rollback: the samples of this many steps, ending with the spike's, are skipped
    loss_spike_lr_factor: float = 1.0  # rollback: the learning rate is multiplied by this for a while after it
    loss_spike_lr_steps: int = 0  # rollback: that while, in steps after the restored checkpoint; 0: off
    max_rollbacks: int = 3  # rollback: after this many within rollback_window_steps, a spike stops the run (exit 3)
    rollback_window_steps: int = 1000  # rollback: the window, in steps, that max_rollbacks counts in
    early_stop_patience: int = 0  # stop (exit 0) after this many evaluations without a better eval loss; 0: off

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
    save_every_minutes: str = "0"  # also save this many minutes after the last save; auto: Young-Daly; 0: off
    save_total_limit: int = 3  # local checkpoints kept
    checkpoint_bucket: str = ""  # URL to upload checkpoints to (gs://, s3://, az://, file://)
    remote_save_total_limit: int = 5  # remote checkpoints kept
    keep_best: bool = False  # retention also keeps the checkpoint with the best eval loss (local and bucket)
    keep_every_steps: int = 0  # retention also keeps every checkpoint whose step is a multiple of this; 0: off
    upload_timeout_seconds: float = 1800.0  # how long the end of training waits for pending uploads
    preemption_grace_seconds: float = 25.0  # budget for the emergency checkpoint and its upload on SIGTERM
    # The stall watchdog (README, Stall watchdog): a process that makes no progress for this long ends the run on
    # every rank with every process's Python stacks, one line naming the stalled rank and phase, and exit 76.
    stall_timeout_minutes: float = 0.0  # a process without progress this long ends the run (exit 76); 0: automatic
    startup_timeout_minutes: float = 30.0  # the same before the first step (checkpoint download, data, compile, peers)
    export_final_model: bool = True
    export_weights: str = "live"  # live | ema: the weights the final export writes (ema needs --ema-decay)
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

    def lr_decay_start(self) -> int:
        """Completed optimizer steps after which the rate leaves its peak: the end of warmup for cosine and linear,
        the last wsd_decay_fraction of the decay steps for wsd, the branch point of a cooldown branch."""
        if self.cooldown_steps:
            return self.max_steps - self.cooldown_steps
        if self.lr_schedule == "wsd":
            decay_steps = self.effective_lr_decay_steps()
            return decay_steps - round(self.wsd_decay_fraction * decay_steps)
        return self.warmup_steps

    def save_interval_minutes(self) -> float | None:
        """--save-every-minutes as a number (0: off), or None for auto."""
        text = str(self.save_every_minutes).strip().lower()
        return None if text == "auto" else float(text)


TEST_MODEL = ModelConfig(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=256,
)

PRODUCTION_LLAMA_MODEL = ModelConfig(
    model_type="llama",
    hidden_size=2048,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=5632,
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
    # The Llama block at the production size: what --target-params 1.2B gives the llama family (1.22 B
    # non-embedding parameters against GPT-NeoX's 1.21 B; tests/test_sizing.py keeps the two in step).
    "production_llama": TrainingConfig(model=PRODUCTION_LLAMA_MODEL),
}


def get_config(name: str) -> TrainingConfig:
    if name not in CONFIGS:
        raise ValueError(f"--config {name!r} is not a known config; choose one of: {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], name=name)


def as_dict(config: TrainingConfig) -> dict:
    """Plain JSON-able values, for checkpoints and W&B."""
    return dataclasses.asdict(config)


def from_dict(values: dict) -> TrainingConfig:
    """The config a checkpoint recorded (as_dict), written by this version or another: fields it lacks take their
    defaults here, fields this version does not know are dropped."""
    known_model = {f.name for f in dataclasses.fields(ModelConfig)}
    known = {f.name for f in dataclasses.fields(TrainingConfig)} - {"model"}
    model = ModelConfig(**{k: v for k, v in values.get("model", {}).items() if k in known_model})
    return TrainingConfig(model=model, **{k: v for k, v in values.items() if k in known})


def with_changes(config: TrainingConfig, **changes) -> TrainingConfig:
    """Copy of `config` with top-level or model fields replaced (model fields are routed to `config.model`)."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_changes = {k: v for k, v in changes.items() if k in model_fields}
    top_changes = {k: v for k, v in changes.items() if k not in model_fields}
    if model_changes:
        top_changes["model"] = dataclasses.replace(config.model, **model_changes)
    return dataclasses.replace(config, **top_changes)
