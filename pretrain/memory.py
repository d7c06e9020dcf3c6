"""Per-GPU memory plan of a training layout (DDP or FSDP, activation checkpointing, micro-batch), and the choice of
the fastest layout that fits a GPU. Pure arithmetic on the model shape, whose family (pretrain.model.families) answers
the parameter and activation counts: no torch, nothing allocated."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from configs import ModelConfig
from pretrain.model.families import family_for

GIB = 1 << 30

# What one card of each class really offers (torch.cuda.mem_get_info's total, GiB), for the README's table and
# for planning without a GPU: the 24 GB class is A10G/L4 (22.5 GiB; an RTX 4090 has 24.0), A100 40 GB has 39.4,
# A100/H100 80 GB have 79.1.
USABLE_GIB = {24: 22.5, 40: 39.4, 80: 79.1}

# CUDA context, cuBLAS/cuDNN workspaces and kernels loaded by torch (measured ~0.6-0.9 GiB on A100/H100 with
# torch 2.x); NCCL's buffers and streams when there is more than one process.
CUDA_CONTEXT_BYTES = int(1.0 * GIB)
NCCL_BYTES = int(0.5 * GIB)
# The caching allocator rounds and fragments: reserved memory runs some percent above the allocated peak.
FRAGMENTATION = 0.05
# A layout "fits" only with this much left over: 5% of the card, at least 1 GiB.
MIN_HEADROOM_FRACTION = 0.05
MIN_HEADROOM_BYTES = 1 * GIB

# Relative step time of a layout, to rank those that fit: FSDP's all-gathers and reduce-scatters mostly overlap
# compute on one machine; each halving of the micro-batch costs a little GPU efficiency (smaller matmuls, more
# launches per token); activation checkpointing recomputes the forward pass (+1/3 of the FLOPs).
_FSDP_COST = 1.03
_HALVING_COST = 1.06
_CHECKPOINTING_COST = 4 / 3


def saved_for_backward_bytes(
    model: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    mixed_precision: str,
    fsdp: bool,
    activation_checkpointing: bool,
    flash_attention: bool = True,
) -> int:
    """Bytes autograd keeps from the forward pass to the backward pass, parameters and autocast's weight copies
    excepted: every layer's saved tensors (or, checkpointed, its input only), the final LayerNorm's and output
    projection's inputs, and log_softmax's fp32 output over the vocabulary."""
    low = 4 if mixed_precision == "no" else 2
    residual = 4 if (low == 4 or not fsdp) else 2
    tokens = micro_batch * seq_len
    if activation_checkpointing:
        layers = model.num_hidden_layers * tokens * model.hidden_size * residual
    else:
        layers = model.num_hidden_layers * family_for(model).layer_activation_bytes(
            model, seq_len, micro_batch, low, residual, flash_attention
        )
    final = family_for(model).final_activation_bytes(model, tokens, low, residual)
    return layers + final + 4 * tokens * model.vocab_size


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU. `total` is the expected peak of the whole process, `headroom` what the card has left.

    The peak is the largest of three moments, each measured on CPU with torch's MemTracker around train_step
    (tests/test_memory_tracker.py): the start of the backward pass (every activation saved, the loss's fp32 logits
    and their gradients: the `production` model's peak), a block's backward pass (the saved activations of the
    blocks before it, its own working set, under checkpointing its recomputed activations), and the optimizer step.
    """

    strategy: str  # "ddp" (one GPU: no wrapper) or "fsdp" (FULL_SHARD, one unit per layer; HYBRID_SHARD across nodes)
    activation_checkpointing: bool
    num_gpus: int
    micro_batch: int
    accumulation: int
    seq_len: int
    mixed_precision: str
    gpu_memory_bytes: int
    weights: int
    gradients: int  # fp32; under FSDP the sharded ones, which exist only from a unit's last backward to zero_grad
    optimizer: int
    low_precision_weights: int  # autocast's bf16/fp16 copies of fp32 weights, kept for the backward pass
    ddp_buckets: int  # a second fp32 gradient copy: 0 with gradient_as_bucket_view (the loop's setting)
    fsdp_unsharded: int  # gathered parameters in flight at the backward's start, no_sync's unsharded gradients
    activations: int  # what autograd keeps from the forward pass for the backward pass, the loss's excepted
    logits_and_loss: int  # the fp32 logits, log-softmax and their gradients at the start of the backward pass
    layer_backward: int  # a block's backward beyond the above, net of what the loss's backward has freed by then
    optimizer_step_temporaries: int  # foreach AdamW's intermediates; the step runs after activations are freed
    overhead: int  # CUDA context, NCCL, allocator fragmentation
    shards: int = 1  # the GPUs the FSDP state is divided over (those of one node under HYBRID_SHARD)
    ema: int = 0  # --ema-decay: an fp32 average of the weights beside them (sharded like them under FSDP)

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ddp_buckets + self.ema

    @property
    def backward_working(self) -> int:
        """The larger of the loss's backward working set and a block's."""
        return max(self.logits_and_loss, self.layer_backward)

    @property
    def in_backward(self) -> int:
        """Allocated at the backward pass's peak. FSDP's sharded gradients appear only as its units finish (they are
        dropped at every step), so under FSDP they are not there; DDP's buckets and a lone GPU's gradients are."""
        gradients = 0 if self.strategy == "fsdp" else self.gradients
        return (self.weights + self.optimizer + self.ema + self.ddp_buckets + gradients + self.low_precision_weights
                + self.fsdp_unsharded + self.activations + self.backward_working)

    @property
    def allocated(self) -> int:
        """The expected peak of allocated tensors (torch.cuda.max_memory_allocated), overhead excepted."""
        return max(self.in_backward, self.static + self.optimizer_step_temporaries)

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    @property
    def headroom(self) -> int:
        return self.gpu_memory_bytes - self.total

    @property
    def verdict(self) -> str:
        if self.headroom < 0:
            return "does not fit"
        if self.headroom < max(MIN_HEADROOM_BYTES, int(MIN_HEADROOM_FRACTION * self.gpu_memory_bytes)):
            return "tight"
        return "fits"

    @property
    def fits(self) -> bool:
        return self.verdict == "fits"

    def describe_layout(self) -> str:
        checkpointing = " + activation checkpointing" if self.activation_checkpointing else ""
        strategy = "1 GPU" if self.num_gpus == 1 else f"{self.strategy.upper()} on {self.num_gpus} GPUs"
        if self.strategy == "fsdp" and self.shards != self.num_gpus:
            strategy += f" (sharded over the {self.shards} of a node)"
        return f"{strategy}{checkpointing}, micro-batch {self.micro_batch} x accumulation {self.accumulation}"

    def lines(self) -> list[str]:
        gradients = "gradients" + (" (sharded, after backward)" if self.strategy == "fsdp" else "")
        working = (("logits and loss", self.logits_and_loss) if self.logits_and_loss >= self.layer_backward
                   else ("one block's backward" + (" (recomputed)" if self.activation_checkpointing else ""),
                         self.layer_backward))
        rows = [
            ("weights", self.weights),
            (gradients, self.gradients),
            ("optimizer state (AdamW)", self.optimizer),
            ("EMA of the weights", self.ema),
            ("low-precision weight copies", self.low_precision_weights),
            ("DDP gradient buckets", self.ddp_buckets),
            ("FSDP unsharded params/grads", self.fsdp_unsharded),
            ("activations" + (" (checkpointed)" if self.activation_checkpointing else ""), self.activations),
            working,
            ("optimizer step temporaries", self.optimizer_step_temporaries),
            ("CUDA context, NCCL, fragmentation", self.overhead),
        ]
        out = [f"memory plan per GPU: {self.describe_layout()}, {self.mixed_precision}"]
        out += [f"  {name:<36}{value / GIB:8.2f} GiB" for name, value in rows if value]
        out.append(f"  {'peak (expected)':<36}{self.total / GIB:8.2f} GiB of {self.gpu_memory_bytes / GIB:.1f} GiB")
        out.append(f"  {'headroom':<36}{self.headroom / GIB:8.2f} GiB: {self.verdict}")
        return out


def plan_memory(
    model: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    accumulation: int,
    num_gpus: int,
    strategy: str,
    activation_checkpointing: bool,
    mixed_precision: str,
    gpu_memory_gib: float,
    fused_optimizer: bool = True,
    flash_attention: bool = True,
    ddp_gradient_as_bucket_view: bool = False,
    fsdp_sync_each_micro_batch: bool = False,
    nodes: int = 1,
    ema_weights: bool = False,
) -> MemoryPlan:
    """The memory of one GPU for a layout; see MemoryPlan. Assumptions (those of pretrain/loop.py today):

    AdamW with fp32 moments; mixed precision by autocast over fp32 weights under DDP (its weight cache off), by
    FSDP's bf16/fp16 parameters under FSDP (buffers in fp32); DDP without gradient_as_bucket_view (Accelerate's
    default: a second fp32 copy of the gradients) unless told; FSDP1 with one unit per block (the family's layer
    class), FULL_SHARD on one node and HYBRID_SHARD (sharded within a node, replicated across nodes) on several,
    whose no_sync (used by Accelerate's accumulate) keeps every unit's unsharded gradient between micro-batches.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy {strategy!r}: expected 'ddp' or 'fsdp'")
    if mixed_precision not in ("bf16", "fp16", "no"):
        raise ValueError(f"mixed_precision {mixed_precision!r}: expected 'bf16', 'fp16' or 'no'")
    if min(seq_len, micro_batch, accumulation, num_gpus, nodes) < 1 or gpu_memory_gib <= 0:
        raise ValueError("seq_len, micro_batch, accumulation, num_gpus and nodes must be >= 1 and gpu_memory_gib > 0")

    family = family_for(model)
    params = family.parameter_count(model)
    layer_params = family.layer_parameters(model)
    root_params = params - model.num_hidden_layers * layer_params  # embeddings, output projection, final norm
    low = 4 if mixed_precision == "no" else 2
    fsdp = strategy == "fsdp" and num_gpus > 1
    # HYBRID_SHARD (configs/accelerate/multi_node_fsdp.yaml) shards within a node and replicates across nodes.
    shards = max(1, num_gpus // nodes) if fsdp else 1

    weights = 4 * params // shards
    gradients = 4 * params // shards
    optimizer = 8 * params // shards
    ema = 4 * params // shards if ema_weights else 0
    ddp_buckets = 4 * params if (not fsdp and num_gpus > 1 and not ddp_gradient_as_bucket_view) else 0
    h, tokens = model.hidden_size, micro_batch * seq_len
    residual = 4 if (low == 4 or not fsdp) else 2
    # Autocast (cache off) casts each fp32 matrix as a matmul uses it, and the matmul keeps the copy for its
    # backward pass; checkpointed blocks drop theirs, so only the output projection's stays until the backward.
    layer_copies = 2 * family.layer_matrix_parameters(model) if (low == 2 and not fsdp) else 0
    output_copy = 2 * model.vocab_size * h if (low == 2 and not fsdp) else 0
    low_precision_weights = output_copy + (0 if activation_checkpointing else model.num_hidden_layers * layer_copies)
    fsdp_unsharded = 0
    if fsdp:
        # At the backward's start FSDP1 holds the root unit (embeddings, output projection), kept gathered from
        # forward to backward, and the last block, prefetched; under no_sync every unit's unsharded gradient
        # (in the compute dtype) stays from the first micro-batch to the last.
        keeps_unsharded_gradients = accumulation > 1 and not fsdp_sync_each_micro_batch
        fsdp_unsharded = low * (root_params + layer_params) + (low * params if keeps_unsharded_gradients else 0)

    saved = saved_for_backward_bytes(
        model, seq_len=seq_len, micro_batch=micro_batch, mixed_precision=mixed_precision, fsdp=fsdp,
        activation_checkpointing=activation_checkpointing, flash_attention=flash_attention,
    )
    activations = saved - 4 * tokens * model.vocab_size  # log_softmax's output is counted with the logits
    # transformers' loss upcasts the logits to fp32; log_softmax keeps its fp32 output, and the backward pass starts
    # with the incoming gradient and log_softmax's gradient (fp32 each) at once: 12 bytes per token and vocab entry.
    logits_and_loss = 12 * tokens * model.vocab_size
    # By a block's backward the loss's tensors, the final norm's and output projection's inputs and the output
    # projection's copy are gone; the block adds its working set and, checkpointed, its recomputed activations and
    # weight copies (its input is the checkpoint already counted), under FSDP one more gathered block (prefetch).
    head_inputs = tokens * h * (residual + low) + 16 * tokens + output_copy
    layer_backward = family.layer_backward_bytes(model, seq_len, micro_batch, low, residual,
                                                 flat_unit_gradient=fsdp) - head_inputs
    if activation_checkpointing:
        layer_backward += layer_copies + family.layer_activation_bytes(
            model, seq_len, micro_batch, low, residual, flash_attention) - tokens * h * residual
    if fsdp:
        layer_backward += low * layer_params

    # foreach AdamW materialises sqrt(v) for a whole parameter group before the update; the fused kernel does not.
    optimizer_step_temporaries = 0 if fused_optimizer else 4 * params // shards

    plan = MemoryPlan(
        strategy="fsdp" if fsdp else "ddp",
        activation_checkpointing=activation_checkpointing,
        num_gpus=num_gpus,
        micro_batch=micro_batch,
        accumulation=accumulation,
        seq_len=seq_len,
        mixed_precision=mixed_precision,
        gpu_memory_bytes=int(gpu_memory_gib * GIB),
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        low_precision_weights=low_precision_weights,
        ddp_buckets=ddp_buckets,
        fsdp_unsharded=fsdp_unsharded,
        activations=activations,
        logits_and_loss=logits_and_loss,
        layer_backward=layer_backward,
        optimizer_step_temporaries=optimizer_step_temporaries,
        overhead=0,
        shards=shards,
        ema=ema,
    )
    overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES if num_gpus > 1 else 0) + int(FRAGMENTATION * plan.allocated)
    return dataclasses.replace(plan, overhead=overhead)


@dataclass(frozen=True)
class Layout:
    strategy: str  # "ddp" | "fsdp"
    activation_checkpointing: bool
    micro_batch: int
    accumulation: int  # micro_batch * accumulation is the same as asked: the global batch never changes
    plan: MemoryPlan
    reason: str  # one line for the console

    @property
    def fits(self) -> bool:
        return self.plan.fits


def choose_layout(
    model: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    accumulation: int,
    num_gpus: int,
    mixed_precision: str,
    gpu_memory_gib: float,
    strategy: str = "auto",
    activation_checkpointing: str | bool = "auto",
    fused_optimizer: bool = True,
    ddp_gradient_as_bucket_view: bool = False,
    fsdp_sync_each_micro_batch: bool = False,
    keep_micro_batch: bool = False,
    nodes: int = 1,
    ema_weights: bool = False,
) -> Layout:
    """The fastest layout that fits with headroom, for `--strategy auto|ddp|fsdp` and
    `--gradient-checkpointing auto|true|false`; a choice that is not "auto" is kept as given.

    Candidates: DDP or FSDP, with or without activation checkpointing, at the asked micro-batch or a divisor of
    it unless keep_micro_batch (accumulation grows so the global batch stays the same), ranked by an estimated
    step time (FSDP x1.03,
    each halving of the micro-batch x1.06, checkpointing x4/3). When nothing fits, the layout with the smallest
    peak is returned, with fits False and a reason that says so: the caller decides to stop or warn.
    """
    strategy = strategy.lower()
    if strategy not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"--strategy {strategy!r}: expected auto, ddp or fsdp")
    if isinstance(activation_checkpointing, str):
        flag = activation_checkpointing.lower()
        if flag not in ("auto", "true", "false"):
            raise ValueError(f"--gradient-checkpointing {activation_checkpointing!r}: expected auto, true or false")
        activation_checkpointing = flag if flag == "auto" else flag == "true"

    strategies = ["ddp", "fsdp"] if strategy == "auto" else [strategy]
    if num_gpus == 1:
        strategies = ["ddp"]  # FSDP over one GPU shards nothing and only adds its own buffers
    checkpointing = [False, True] if activation_checkpointing == "auto" else [activation_checkpointing]
    micro_batches = [m for m in range(micro_batch, 0, -1) if micro_batch % m == 0]
    if keep_micro_batch:
        micro_batches = [micro_batch]

    candidates = []
    for m in micro_batches:
        for s in strategies:
            for ac in checkpointing:
                cost = (_FSDP_COST if s == "fsdp" else 1.0) * _HALVING_COST ** math.log2(micro_batch / m)
                cost *= _CHECKPOINTING_COST if ac else 1.0
                plan = plan_memory(
                    model, seq_len=seq_len, micro_batch=m, accumulation=accumulation * (micro_batch // m),
                    num_gpus=num_gpus, strategy=s, activation_checkpointing=ac, mixed_precision=mixed_precision,
                    gpu_memory_gib=gpu_memory_gib, fused_optimizer=fused_optimizer,
                    ddp_gradient_as_bucket_view=ddp_gradient_as_bucket_view,
                    fsdp_sync_each_micro_batch=fsdp_sync_each_micro_batch, nodes=nodes,
                    ema_weights=ema_weights,
                )
                candidates.append((cost, plan))
    candidates.sort(key=lambda c: c[0])  # stable: at equal cost, the asked micro-batch and DDP come first
    fastest = candidates[0][1]
    for _cost, plan in candidates:
        if plan.fits:
            if plan is fastest:
                reason = f"{plan.describe_layout()}: fits, {plan.headroom / GIB:.1f} GiB headroom"
            else:
                first = fastest
                reason = (
                    f"{plan.describe_layout()}: the faster {first.describe_layout()} needs "
                    f"{first.total / GIB:.1f} GiB of {first.gpu_memory_bytes / GIB:.1f} GiB; this one "
                    f"{plan.total / GIB:.1f} GiB ({plan.headroom / GIB:.1f} GiB headroom)"
                )
            return _layout(plan, reason)
    smallest = min((plan for _, plan in candidates), key=lambda p: p.total)
    reason = (
        f"nothing fits {smallest.gpu_memory_bytes / GIB:.1f} GiB per GPU: the smallest layout, "
        f"{smallest.describe_layout()}, needs {smallest.total / GIB:.1f} GiB; use more or larger GPUs, "
        f"or a shorter --seq-len"
    )
    return _layout(smallest, reason)


def _layout(plan: MemoryPlan, reason: str) -> Layout:
    return Layout(
        strategy=plan.strategy,
        activation_checkpointing=plan.activation_checkpointing,
        micro_batch=plan.micro_batch,
        accumulation=plan.accumulation,
        plan=plan,
        reason=reason,
    )


def measured_gpu_memory_gib(device_index: int = 0) -> float | None:
    """The card's total memory (torch.cuda.mem_get_info) when a GPU is there, else None: plan with a given size."""
    import torch  # only here: the plan itself is pure arithmetic

    if not torch.cuda.is_available():
        return None
    _free, total = torch.cuda.mem_get_info(device_index)
    return total / GIB


def plan_for_config(config, *, num_gpus: int, gpu_memory_gib: float, strategy: str = "auto",
                    activation_checkpointing: str | bool = "auto", keep_micro_batch: bool = False, nodes: int = 1,
                    **assumptions) -> Layout:
    """choose_layout with a TrainingConfig's shape, batch and precision. With keep_micro_batch the layout keeps the
    config's micro-batch; otherwise apply the chosen one with with_layout(config, layout), or the run may not fit.
    num_gpus counts all nodes' GPUs; `nodes` > 1 plans FSDP as HYBRID_SHARD, sharded over one node's GPUs.
    `assumptions`: fused_optimizer, ddp_gradient_as_bucket_view, fsdp_sync_each_micro_batch (see plan_memory); by
    default those of the training loop, whose DDP keeps its gradients as views of the all-reduce buckets, with an EMA
    of the weights when the config keeps one."""
    assumptions = {"ddp_gradient_as_bucket_view": True, "ema_weights": config.ema_decay > 0, **assumptions}
    return choose_layout(
        config.model, seq_len=config.seq_len, micro_batch=config.per_device_train_batch_size,
        accumulation=config.gradient_accumulation_steps, num_gpus=num_gpus, mixed_precision=config.mixed_precision,
        gpu_memory_gib=gpu_memory_gib, strategy=strategy, activation_checkpointing=activation_checkpointing,
        keep_micro_batch=keep_micro_batch, nodes=nodes, **assumptions,
    )


def with_layout(config, layout: Layout):
    """The config with the layout's micro-batch and accumulation (the global batch is unchanged)."""
    return dataclasses.replace(
        config, per_device_train_batch_size=layout.micro_batch, gradient_accumulation_steps=layout.accumulation
    )
