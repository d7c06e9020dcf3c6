"""torch's MemTracker around the product's own train_step, its peaks split into the terms of pretrain/memory.py, so
each term of the plan is held against PyTorch's own accounting of real tensors (tests/test_memory_tracker.py)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pretrain.memory import MemoryPlan

# The plan's terms the tracker can see; CUDA context, NCCL and the allocator's slack are not tensors.
TERMS = ("weights", "gradients", "optimizer", "low_precision_weights", "fsdp_unsharded", "activations",
         "logits_and_loss")
PHASES = ("forward", "head backward", "block backward", "optimizer step")
_BY_REFTYPE = {_MemRefType.PARAM: "weights", _MemRefType.GRAD: "gradients", _MemRefType.OPT: "optimizer"}
_FSDP_BUFFERS = ("_full_param_padded", "_full_prec_full_param_padded", "_mp_shard")


class PlanTermTracker(MemTracker):
    """A MemTracker that tags every storage it sees created with the plan term it belongs to, and keeps the split of
    the memory at the peak of each phase of a step: the forward pass, the start of the backward pass (the loss and
    output head), a block's backward pass, the optimizer step.

    Tags: autocast's copies of parameters (`_to_copy` of a parameter) are low-precision weights; anything whose last
    dimension is the vocabulary (logits, log-softmax, their gradients) is the loss's; storages made while wrapping
    set-up that survive it untyped are DDP's gradient buckets (setting_up); FSDP1's gathered flat parameters and the
    unsharded gradients they accumulate are FSDP's (track_fsdp); everything else made in forward and backward is
    activations. MemTracker alone
    refuses the root module's second forward in one context; here each micro-batch may run one."""

    def __init__(self, vocab_size: int, blocks: tuple[type, ...]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.blocks = blocks
        self.phases: dict[str, tuple[int, dict[str, int]]] = {}
        self._block_names: set[str] = set()
        self._op: tuple | None = None
        self._wrapping = False
        self._flat_params: list[torch.Tensor] = []
        self._grad_hook = None
        self._pending_term: str | None = None
        self._totals: dict[str, int] = dict.fromkeys((*TERMS, "other"), 0)

    @contextlib.contextmanager
    def setting_up(self):
        """Around the set-up before the measured step (wrapping, a restore, the steps before): what survives it and is
        no parameter, gradient or optimizer state is DDP's buckets (made as it wraps, remade after the first
        synchronised backward), the gradients' storage. Phases and peaks start again at the next entry."""
        self._wrapping = True
        try:
            with self:
                yield
        finally:
            self._wrapping = False

    def track_fsdp(self, model: torch.nn.Module) -> None:
        """FSDP1: each unit's gathered flat parameter and its unsharded gradient (kept across micro-batches under
        no_sync) are FSDP's; the sharded gradients it leaves for the optimizer are the plan's gradients."""
        for module in model.modules():
            flat = getattr(getattr(module, "_handle", None), "flat_param", None)
            if flat is None:
                continue
            self._flat_params.append(flat)
            flat.register_post_accumulate_grad_hook(self._unsharded_gradient)
            for name in _FSDP_BUFFERS:
                buffer = getattr(flat, name, None)
                if buffer is not None:
                    for winfo in self._update_and_maybe_create_winfos(buffer, _MemRefType.ACT):
                        self._retag(winfo, "fsdp_unsharded")

    def _unsharded_gradient(self, flat: torch.Tensor) -> None:
        if flat.grad is not None:
            for winfo in self._update_and_maybe_create_winfos(flat.grad, _MemRefType.TEMP):
                self._retag(winfo, "fsdp_unsharded")

    def _retag(self, winfo, term: str) -> None:
        self._totals[self._resolve(winfo, winfo.reftype)] -= winfo.mem_consumed
        winfo.term = term
        self._totals[self._resolve(winfo, winfo.reftype)] += winfo.mem_consumed

    @staticmethod
    def _resolve(winfo, reftype) -> str:
        term = getattr(winfo, "term", None)
        if term == "fsdp_unsharded":
            return term
        if reftype in _BY_REFTYPE:
            return _BY_REFTYPE[reftype]
        if reftype in (_MemRefType.ACT, _MemRefType.TEMP):
            return term or "activations"
        return "other"  # buffers

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
        if not hasattr(winfo, "term"):
            winfo.term = self._pending_term
        name = u_type.name
        if name == "ADD":
            self._totals[self._resolve(winfo, winfo.reftype)] += winfo.mem_consumed
        elif name == "DEL":
            self._totals[self._resolve(winfo, winfo.reftype)] -= winfo.mem_consumed
        elif name == "REF":
            self._totals[self._resolve(winfo, old_reftype)] -= winfo.mem_consumed
            self._totals[self._resolve(winfo, winfo.reftype)] += winfo.mem_consumed
        else:
            self._totals[self._resolve(winfo, winfo.reftype)] += winfo.mem_consumed - old_mem_consumed

    def __enter__(self) -> PlanTermTracker:
        if self._depth == 0:
            self.phases = {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = (func, args)
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self._op = None

    def _track(self, reftype, t: torch.Tensor) -> None:
        self._pending_term = self._term_of_new(t)
        try:
            super()._track(reftype, t)
        finally:
            self._pending_term = None

    def _term_of_new(self, t: torch.Tensor) -> str:
        if self._wrapping:
            return "gradients"
        func, args = self._op if self._op is not None else (None, ())
        if "_to_copy" in str(func) and args and isinstance(args[0], torch.Tensor) and self._is_parameter(args[0]):
            return "low_precision_weights"
        if t.dim() >= 2 and t.shape[-1] == self.vocab_size:
            return "logits_and_loss"
        return "activations"

    def _is_parameter(self, t: torch.Tensor) -> bool:
        winfos = [self._WINFO.get(s, (None, None))[0] for s in get_untyped_storages(t)]
        return any(winfo is not None and winfo.reftype == _MemRefType.PARAM for winfo in winfos)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True) -> tuple[int, int]:
        # FSDP1 (use_orig_params) runs the forward on views of its flat parameters, which take no gradient hooks
        hooks = install_grad_hooks and all(p.is_leaf for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks=hooks)

    def _pre_fw_hook(self, module, inputs) -> None:
        if isinstance(module, self.blocks):
            self._block_names.add(self._mod_tracker.get_known_fqn(module))
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                self.reset_mod_stats()  # the next micro-batch
        super()._pre_fw_hook(module, inputs)

    def _register_global_optimizer_hook(self) -> None:
        super()._register_global_optimizer_hook()

        def gradients_are_gradients(optimizer, args, kwargs) -> None:
            # FSDP's sharded gradients are made by its hooks, out of the tracker's sight as gradients
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if parameter.grad is not None:
                        self._update_and_maybe_create_winfos(parameter.grad, _MemRefType.GRAD)

        self._grad_hook = register_optimizer_step_pre_hook(gradients_are_gradients)

    def _deregister_param_and_optimizer_hooks(self) -> None:
        super()._deregister_param_and_optimizer_hooks()
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        phase = self._phase()
        now = sum(snapshot["Total"] for snapshot in self._curr_mem_snap.values())
        if now > self.phases.get(phase, (0, None))[0]:
            self.phases[phase] = (now, self.terms_now())

    def _phase(self) -> str:
        if self._in_opt:
            return "optimizer step"
        if not self._mod_tracker.is_bw:
            return "forward"
        return "block backward" if self._block_names & set(self._mod_tracker.parents) else "head backward"

    def terms_now(self) -> dict[str, int]:
        return dict(self._totals)

    @property
    def peak(self) -> int:
        return sum(self._peak_mem.values())


@dataclass(frozen=True)
class Comparison:
    """One term or phase total: the plan's bytes against the tracker's."""

    name: str
    planned: int
    measured: int

    @property
    def ratio(self) -> float:
        if not self.measured:
            return 1.0 if not self.planned else float("inf")
        return self.planned / self.measured


def planned_phases(plan: MemoryPlan) -> dict[str, int]:
    """What the plan expects allocated at the peak of each phase of a step. The forward pass is planned as never the
    peak (the end of the forward holds what the backward's start holds, less the loss's gradients): the tracker's
    forward phase is compared with the backward's start instead, as an upper bound that must hold."""
    base = plan.in_backward - plan.backward_working
    return {"forward": base + plan.logits_and_loss, "head backward": base + plan.logits_and_loss,
            "block backward": base + plan.layer_backward,
            "optimizer step": plan.static + plan.optimizer_step_temporaries}


def compare(plan: MemoryPlan, tracker: PlanTermTracker) -> list[Comparison]:
    """Each term of the plan at the backward's start (the optimizer's gradients at the optimizer step, FSDP's sharded
    ones exist only then), each phase's total, and the peak of the step. Phase totals that are bounds rather than
    estimates (the forward pass, the optimizer step) are judged by the caller."""
    head = tracker.phases["head backward"][1]
    rows = []
    for term in TERMS:
        planned, measured = getattr(plan, term), head[term]
        if term == "gradients":
            planned += plan.ddp_buckets
            if plan.strategy == "fsdp":
                measured = tracker.phases["optimizer step"][1][term]
        rows.append(Comparison(term, planned, measured))
    planned = planned_phases(plan)
    rows += [Comparison(phase, planned[phase], tracker.phases[phase][0]) for phase in PHASES]
    rows.append(Comparison("peak", plan.allocated, tracker.peak))
    return rows


def describe(rows: list[Comparison]) -> str:
    return "\n".join(f"  {row.name:<24}{row.planned:>12,} planned {row.measured:>12,} measured  {row.ratio:6.3f}"
                     for row in rows)
