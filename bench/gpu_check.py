"""GPU check of the production shape on one GPU through the product's own step: make_accelerator, prepare, train_step
with the loop's per-step bookkeeping, and compiled_with_fallback. Measures peak allocated memory against
pretrain/memory.py's plan on the card and under 40 and 24 GB caps, tokens/s and MFU eager and compiled, the
attention kernels, host syncs per step, fused against foreach AdamW; prints one table and one JSON line.

Needs only torch, transformers, accelerate, numpy and safetensors: no set-up, no network, no cloud SDK.

    python3 bench/gpu_check.py [--budget-seconds 400] [--json results.json]
    python3 bench/gpu_check.py --cpu-smoke      # the same code path on the test model on CPU (the suite runs this)
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts the imports too

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import TEST_MODEL, get_config  # noqa: E402
from pretrain.agreement import Agreement  # noqa: E402
from pretrain.loop import (  # noqa: E402
    compiled_with_fallback,
    count_skipped,
    make_accelerator,
    place_gradients_in_buckets,
    train_step,
)
from pretrain.memory import CUDA_CONTEXT_BYTES, GIB, USABLE_GIB, plan_memory  # noqa: E402
from pretrain.metrics import Metrics, ThroughputModel  # noqa: E402
from pretrain.model.build import build_model  # noqa: E402
from pretrain.model.families import family_for  # noqa: E402
from pretrain.model.peaks import peak_flops_per_device  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402

# (part, planned seconds on one H100, what it does). Estimates from the shapes (no GPU was available to time them):
# a production step is 16,384 tokens x 8.2 GFLOP = 134 TFLOP, about 0.35 s at 40% of an H100's 989 TFLOPS.
PARTS = (
    ("start-up", 25, "imports, CUDA context, the Accelerator, the plan"),
    ("eager", 45, "the card: model and optimizer, 1 warm-up step, 1 step counting syncs, 6 timed, 1 profiled"),
    ("adamw", 20, "fused against foreach AdamW: 1 + 5 steps each on the production parameters"),
    ("cap 40 GB", 30, "the configured layout in 39.4 GiB: the plan says it fits; 2 steps"),
    ("cap 24 GB", 20, "the same in 22.5 GiB: the plan says it does not; out of memory at the first step"),
    ("compiled", 180, "torch.compile (inductor) warmed up as the loop does (most of it), 4 timed steps, 1 profiled"),
)
PLANNED_SECONDS = sum(seconds for _, seconds, _ in PARTS)  # 320 of the 400 s budget: 80 s for compile variance
ATTENTION_WORDS = ("attention", "fmha", "flash", "sdpa", "cudnn")
CPU_ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = STARTED
        self.smoke = args.cpu_smoke
        production = get_config("production")
        if self.smoke:  # the test model, bf16 autocast on CPU, dynamo without code generation
            self.config = dataclasses.replace(production, model=TEST_MODEL, seq_len=128, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, cpu_mixed_precision=True)
        else:
            self.config = production
        self.backend = "eager" if self.smoke else self.config.compile_backend
        self.accelerator = make_accelerator(self.config)
        self.device = self.accelerator.device
        self.cuda = self.device.type == "cuda"
        self.precision = self.accelerator.mixed_precision
        self.name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.total_bytes = torch.cuda.mem_get_info(self.device)[1] if self.cuda else 0
        self.peak_flops = peak_flops_per_device(self.device, 0.0, self.precision)
        model = self.config.model
        self.flops_per_token = family_for(model).flops_per_token(model, self.config.seq_len)
        self.results: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}

    @property
    def micro_batch(self) -> int:
        return self.config.per_device_train_batch_size

    @property
    def accumulation(self) -> int:
        return self.config.gradient_accumulation_steps

    def plan(self, gpu_gib: float):
        c = self.config
        return plan_memory(c.model, seq_len=c.seq_len, micro_batch=self.micro_batch, accumulation=self.accumulation,
                           num_gpus=1, strategy="ddp", activation_checkpointing=False,
                           mixed_precision=self.precision, gpu_memory_gib=gpu_gib)

    def left(self) -> float:
        return self.args.budget_seconds - (time.monotonic() - self.started)

    def part(self, name: str, function, **kwargs) -> None:
        planned = dict((part, seconds) for part, seconds, _ in PARTS)[name]
        if not self.smoke and self.left() < planned:
            self.results[name] = {"skipped": f"{self.left():.0f} s of budget left, planned {planned} s"}
            print(f"[{name}] skipped: {self.results[name]['skipped']}", flush=True)
            return
        print(f"[{name}] running", flush=True)
        started = time.monotonic()
        try:
            result = function(**kwargs)
        except Exception as error:  # one part's failure must not stop the others
            traceback.print_exc(limit=4)
            result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
        finally:
            self.release()
        self.seconds[name] = round(time.monotonic() - started, 1)
        self.results[name] = result
        print(f"[{name}] {self.seconds[name]} s: " + json.dumps(result), flush=True)

    def release(self) -> None:
        self.accelerator.free_memory()  # drops prepare()'s references, resets the accumulation counter
        gc.collect()
        torch._dynamo.reset()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def batches(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        shape = (self.micro_batch, self.config.seq_len)
        batches = [torch.randint(0, self.config.model.vocab_size, shape, generator=generator) for _ in range(4)]
        return [batch.pin_memory() for batch in batches] if self.cuda else batches  # as the loop's loader

    def train(self, *, steps: int, compiled: bool = False, cap_gib: float | None = None, count_syncs: bool = True,
              profile: bool = True) -> dict:
        """The product's step on the production shape, with the loop's per-step bookkeeping (non-finite counts, the
        one-step-late agreement, the metrics of a step that is not logged)."""
        if cap_gib is not None and self.cuda:
            # a card of cap_gib whose CUDA context takes its share: what the allocator may use
            fraction = (cap_gib * GIB - CUDA_CONTEXT_BYTES) / self.total_bytes
            torch.cuda.set_per_process_memory_fraction(fraction, self.device)
        config, accelerator = self.config, self.accelerator
        torch.manual_seed(0)
        model = build_model(config.model, device=self.device)
        optimizer = build_optimizer(model, config)
        model, optimizer = accelerator.prepare(model, optimizer)
        place_gradients_in_buckets(model, accelerator)
        batches = self.batches()
        result: dict = {"fused_adamw": bool(optimizer.optimizer.defaults.get("fused"))}
        if compiled:
            started = time.monotonic()
            model = compiled_with_fallback(model, optimizer, accelerator, batches[0], self.backend)
            self.synchronize()
            result["compile_s"] = round(time.monotonic() - started, 1)
            result["compiled"] = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        stream = itertools.cycle(batches)
        consecutive = torch.zeros((), dtype=torch.int64, device=self.device)
        skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        agreement = Agreement(self.device, accelerator.num_processes)
        throughput = ThroughputModel(self.micro_batch * self.accumulation * config.seq_len, self.flops_per_token, None)
        metrics = Metrics(Path(tempfile.gettempdir()), False, 10**9, 10**9, 0, throughput)  # not rank 0: no files

        def step(number: int):
            nonlocal consecutive, skipped
            outcome = train_step(model, optimizer, accelerator, stream, self.accumulation, config.max_grad_norm, 1e-4)
            consecutive, skipped = count_skipped(consecutive, skipped, outcome.skipped)
            metrics.end_step(number, outcome.loss_sum, self.accumulation, accelerator)
            agreement.exchange(number, False, False, False, consecutive, outcome.loss_sum / self.accumulation,
                               outcome.grad_norm, outcome.spike_skipped)
            return outcome

        started = time.monotonic()
        step(1)  # the optimizer state appears here
        self.synchronize()
        result["first_step_s"] = round(time.monotonic() - started, 2)
        if count_syncs and self.cuda:
            result.update(self.syncs(lambda: step(2)))
        self.synchronize()
        started = time.monotonic()
        for number in range(steps):
            last = step(3 + number)
        self.synchronize()
        elapsed = time.monotonic() - started
        tokens_per_s = steps * self.accumulation * self.micro_batch * config.seq_len / elapsed
        result["loss"] = round(float(last.loss_sum) / self.accumulation, 4)
        result["tokens_per_s"] = round(tokens_per_s)
        result["mfu"] = round(tokens_per_s * self.flops_per_token / self.peak_flops, 3) if self.peak_flops else None
        if profile:
            result["attention_kernels"] = self.attention_kernels(lambda: step(3 + steps))
        result.update(self.memory(cap_gib))
        return result

    def syncs(self, function) -> dict:
        """Host syncs in one step, by torch.cuda.set_sync_debug_mode: each synchronizing CUDA call warns once."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                function()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        found = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in found})
        return {"syncs_per_step": len(found), "sync_sites": where[:5]}

    def attention_kernels(self, function) -> dict[str, int]:
        """The attention kernels one step ran, with their counts: the device kernels the profiler records on CUDA
        (flash, cuDNN, memory-efficient or math), the SDPA implementation ops on CPU."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            function()
            self.synchronize()
        seen: dict[str, int] = {}
        for event in profiler.key_averages():
            if self.cuda:
                wanted = event.device_type == torch.autograd.DeviceType.CUDA and any(
                    word in event.key.lower() for word in ATTENTION_WORDS)
            else:
                wanted = event.key.startswith(CPU_ATTENTION_OPS)
            if wanted:
                seen[event.key[:90]] = event.count
        return seen

    def memory(self, cap_gib: float | None) -> dict:
        if not self.cuda:
            return {}
        plan = self.plan(cap_gib or self.total_bytes / GIB)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return {
            "peak_allocated_gib": round(peak / GIB, 2),
            "plan_allocated_gib": round(plan.allocated / GIB, 2),
            "peak_over_plan": round(peak / plan.allocated, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GIB, 2),
            # what the process holds outside PyTorch's allocator: CUDA context, cuBLAS/cuDNN workspaces (the plan's
            # CUDA_CONTEXT_BYTES guess), if nothing else runs on the card
            "outside_allocator_gib": round((total - free - torch.cuda.memory_reserved(self.device)) / GIB, 2),
            "plan_total_gib": round(plan.total / GIB, 2),
            "plan_verdict": plan.verdict,
        }

    def capped(self, cap_gib: float) -> dict:
        """The plan's verdict for a card of cap_gib against what happens: "does not fit" should meet an out-of-memory
        error and "fits" or "tight" should run through."""
        verdict = self.plan(cap_gib).verdict
        try:
            result = self.train(steps=1, cap_gib=cap_gib, count_syncs=False, profile=False)
            result["out_of_memory"] = False
        except torch.OutOfMemoryError as error:
            result = {"out_of_memory": True, "message": str(error).splitlines()[0][:160]}
        result["plan_verdict"] = verdict
        result["plan_agrees"] = result["out_of_memory"] == (verdict == "does not fit")
        return result

    def adamw(self) -> dict:
        """Milliseconds per AdamW step on the production parameters: the product's optimizer (fused on CUDA) against
        the foreach implementation, with zero gradients."""
        model = build_model(self.config.model, device=self.device)
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        product = build_optimizer(model, self.config)
        foreach = torch.optim.AdamW(product.param_groups[0]["params"] + product.param_groups[1]["params"], lr=1e-4,
                                    foreach=True)
        result = {"fused": bool(product.defaults.get("fused"))}
        for name, optimizer in (("product_ms", product), ("foreach_ms", foreach)):
            optimizer.step()  # the state appears here
            self.synchronize()
            started = time.monotonic()
            for _ in range(5):
                optimizer.step()
            self.synchronize()
            result[name] = round((time.monotonic() - started) / 5 * 1000, 2)
            optimizer.state.clear()
        return result

    def run(self) -> dict:
        c = self.config
        plan = self.plan(self.total_bytes / GIB if self.cuda else 80)
        self.seconds["start-up"] = round(time.monotonic() - self.started, 1)
        self.results["start-up"] = {"device": self.name, "torch": torch.__version__, "precision": self.precision,
                                    "plan": plan.describe_layout(),
                                    "plan_allocated_gib": round(plan.allocated / GIB, 2)}
        print(f"device: {self.name}, {self.total_bytes / GIB:.1f} GiB, torch {torch.__version__}, {self.precision}, "
              f"peak {self.peak_flops / 1e12 if self.peak_flops else None} TFLOPS; {c.seq_len} tokens x micro-batch "
              f"{self.micro_batch} x accumulation {self.accumulation}", flush=True)
        steps = 2 if self.smoke else 6
        self.part("eager", self.train, steps=steps)
        self.part("adamw", self.adamw)
        if self.cuda:
            for name, gib in (("cap 40 GB", USABLE_GIB[40]), ("cap 24 GB", USABLE_GIB[24])):
                self.part(name, self.capped, cap_gib=gib)
        self.part("compiled", self.train, steps=max(2, steps - 2), compiled=True)
        return {"device": self.name, "torch": torch.__version__, "budget_s": self.args.budget_seconds,
                "planned_s": dict((part, seconds) for part, seconds, _ in PARTS), "seconds": self.seconds,
                "parts": self.results}


def table(summary: dict) -> str:
    """One line per part: planned and used seconds, and what it found."""
    lines = [f"{'part':<11}{'planned s':>10}{'used s':>8}  result"]
    for name, planned, _ in PARTS:
        result = summary["parts"].get(name)
        used = summary["seconds"].get(name)
        lines.append(f"{name:<11}{planned:>10}{'' if used is None else used:>8}  {describe(name, result)}")
    total = sum(summary["seconds"].values())
    lines.append(f"{'total':<11}{PLANNED_SECONDS:>10}{total:>8.1f}  of a {summary['budget_s']:.0f} s budget")
    return "\n".join(lines)


def describe(name: str, result: dict | None) -> str:
    if result is None:
        return "not run (no GPU)"
    if "skipped" in result or "error" in result:
        return result.get("skipped") or result["error"]
    if name == "start-up":
        return f"plan: {result['plan']}, {result['plan_allocated_gib']} GiB allocated"
    if name == "adamw":
        return f"fused {result['fused']}: {result['product_ms']} ms per step, foreach {result['foreach_ms']} ms"
    parts = []
    if "peak_allocated_gib" in result:
        parts.append(f"peak {result['peak_allocated_gib']} GiB vs plan {result['plan_allocated_gib']} "
                     f"({result['peak_over_plan']}x), reserved {result['peak_reserved_gib']}, outside the allocator "
                     f"{result['outside_allocator_gib']}")
    if "out_of_memory" in result:
        parts.append(f"plan {result['plan_verdict']}, {'out of memory' if result['out_of_memory'] else 'ran'}: "
                     f"{'agrees' if result['plan_agrees'] else 'DISAGREES'}")
    if "tokens_per_s" in result:
        mfu = f", MFU {100 * result['mfu']:.1f}%" if result.get("mfu") else ""
        parts.append(f"{result['tokens_per_s']:,} tok/s{mfu}")
    if "compile_s" in result:
        parts.append(f"compile {result['compile_s']} s{'' if result['compiled'] else ' (FELL BACK TO EAGER)'}")
    if result.get("syncs_per_step") is not None:
        parts.append(f"{result['syncs_per_step']} syncs/step")
    if result.get("attention_kernels"):
        parts.append("attention: " + ", ".join(f"{k} x{v}" for k, v in list(result["attention_kernels"].items())[:3]))
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=400.0)
    parser.add_argument("--cpu-smoke", action="store_true", help="the test model on CPU: the same code path, no GPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU visible; run with --cpu-smoke to exercise the code on CPU", file=sys.stderr)
        return 2
    summary = Check(args).run()
    print(table(summary))
    print("gpu_check.json " + json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    failed = [name for name, result in summary["parts"].items() if "error" in result]
    disagreed = [name for name, result in summary["parts"].items() if result.get("plan_agrees") is False]
    return 1 if failed or disagreed else 0


if __name__ == "__main__":
    sys.exit(main())
