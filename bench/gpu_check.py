"""GPU check of the production shape on one GPU: peak memory against pretrain/memory.py's plan (also under 24 GB
and 40 GB caps), attention kernels, host syncs per step, tokens/s and MFU, eager against torch.compile, fused
against foreach AdamW. Each check prints its own error and the next one runs; a time budget bounds the whole.

    python bench/gpu_check.py [--budget-seconds 420] [--steps 20] [--json results.json]
    python bench/gpu_check.py --cpu-smoke      # the same code paths on the test model on CPU (no caps, no syncs)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import TEST_MODEL, get_config  # noqa: E402
from pretrain.memory import CUDA_CONTEXT_BYTES, GIB, USABLE_GIB, plan_memory  # noqa: E402
from pretrain.model.build import (
    build_model,
    count_parameters,
    enable_activation_checkpointing,
)
from pretrain.model.families import family_for
from pretrain.model.peaks import peak_tflops_for_name

ATTENTION_KERNELS = {"flash": "flash", "cudnn": "cudnn", "efficient": "efficient", "fmha": "efficient", "math": "math"}


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = not args.cpu_smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        config = get_config("production")
        self.model_config = TEST_MODEL if args.cpu_smoke else config.model
        self.seq_len = 128 if args.cpu_smoke else config.seq_len
        self.micro_batch = 2 if args.cpu_smoke else config.per_device_train_batch_size
        self.accumulation = 2
        self.budget = Budget(args.budget_seconds)
        self.results: dict[str, dict] = {}
        self.name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.total_bytes = torch.cuda.mem_get_info()[1] if self.cuda else 0
        self.peak_tflops = peak_tflops_for_name(self.name, "bf16") if self.cuda else None
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def plan(self, gpu_gib: float, **changes):
        arguments = dict(
            seq_len=self.seq_len, micro_batch=self.micro_batch, accumulation=self.accumulation, num_gpus=1,
            strategy="ddp", activation_checkpointing=False, mixed_precision="bf16", gpu_memory_gib=gpu_gib,
        )
        arguments.update(changes)
        return plan_memory(self.model_config, **arguments)

    def run_check(self, name: str, estimate_s: float, function, **kwargs):
        if self.budget.left() < estimate_s:
            print(f"[{name}] skipped: {self.budget.left():.0f} s of budget left, needs about {estimate_s:.0f} s")
            self.results[name] = {"skipped": True}
            return
        print(f"[{name}] running")
        started = time.monotonic()
        try:
            result = function(**kwargs)
        except Exception as error:  # one check's failure must not stop the others
            traceback.print_exc(limit=3)
            result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
        finally:
            self.release()
        result["seconds"] = round(time.monotonic() - started, 1)
        self.results[name] = result
        print(f"[{name}] " + json.dumps(result))

    def release(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_per_process_memory_fraction(1.0)
        torch._dynamo.reset()

    def train(self, *, steps: int, compile_model: bool = False, fused: bool = True, attn: str = "causal_sdpa",
              checkpointing: bool = False, micro_batch: int | None = None, cap_gib: float | None = None,
              profile: bool = True, count_syncs: bool = True) -> dict:
        micro_batch = micro_batch or self.micro_batch
        if cap_gib is not None and self.cuda:
            # A card of cap_gib GiB whose CUDA context takes its share: what the allocator may use.
            torch.cuda.set_per_process_memory_fraction((cap_gib * GIB - CUDA_CONTEXT_BYTES) / self.total_bytes)
        torch.manual_seed(0)
        model = build_model(self.model_config, device=self.device, attn_implementation=attn)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
        size = count_parameters(model)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4, betas=(0.9, 0.95), fused=fused if self.cuda else None, foreach=None if fused else True,
        )
        run = model
        if compile_model:
            run = torch.compile(model, backend="inductor" if self.cuda else "aot_eager")
        generator = torch.Generator(device="cpu").manual_seed(0)
        vocab = self.model_config.vocab_size
        batches = [torch.randint(0, vocab, (micro_batch, self.seq_len), generator=generator).to(self.device)
                   for _ in range(4)]
        accumulation = self.accumulation * self.micro_batch // micro_batch
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda)

        def micro_step(index: int):
            input_ids = batches[index % len(batches)]
            with autocast:
                loss = run(input_ids=input_ids, labels=input_ids).loss / accumulation
            loss.backward()
            return loss.detach()

        def step(index: int):
            losses = [micro_step(index * accumulation + i) for i in range(accumulation)]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return torch.stack(losses).sum()

        started = time.monotonic()
        step(0)  # compile, allocate the optimizer state
        self.synchronize()
        first_step_s = time.monotonic() - started
        warmup = 2
        for index in range(1, warmup):
            step(index)
        syncs = None
        if count_syncs and self.cuda:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step(warmup)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
        self.synchronize()
        timed = max(1, steps - warmup - 1)
        # Skipped under a cap: its zero gradients are an allocation the capped run would not make.
        optimizer_ms = self.time_optimizer_step(optimizer) if self.cuda and cap_gib is None else None
        started = time.monotonic()
        last = None
        for index in range(timed):
            last = step(warmup + 1 + index)
        self.synchronize()
        elapsed = time.monotonic() - started
        tokens = timed * accumulation * micro_batch * self.seq_len
        tokens_per_s = tokens / elapsed
        result = {
            "loss": round(float(last), 4),
            "first_step_s": round(first_step_s, 1),
            "tokens_per_s": round(tokens_per_s),
            "syncs_per_step": syncs,
            "optimizer_step_ms": optimizer_ms,
        }
        if self.peak_tflops:
            result["mfu"] = round(tokens_per_s * family_for(self.model_config).flops_per_token(self.model_config, self.seq_len)
                                  / (self.peak_tflops * 1e12), 3)
        if profile:
            result["attention_kernels"] = self.attention_kernels(lambda: micro_step(0))
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            plan = self.plan(cap_gib or self.total_bytes / GIB, micro_batch=micro_batch, accumulation=accumulation,
                             activation_checkpointing=checkpointing, fused_optimizer=fused)
            # The plan's total includes the CUDA context and fragmentation, which max_memory_allocated does not see.
            planned_allocated = plan.total - plan.overhead
            result.update(peak_allocated_gib=round(peak / GIB, 2), plan_allocated_gib=round(planned_allocated / GIB, 2),
                          peak_over_plan=round(peak / planned_allocated, 3), plan_verdict=plan.verdict,
                          peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
        del run, model, optimizer, batches
        return result

    def time_optimizer_step(self, optimizer) -> float:
        """Milliseconds of one optimizer step (fused or foreach), with the gradients of the step before."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        optimizer.step()
        end.record()
        end.synchronize()
        optimizer.zero_grad(set_to_none=True)
        return round(start.elapsed_time(end), 2)

    def attention_kernels(self, function) -> dict[str, int]:
        """Which SDPA kernels one micro-step ran, by the names the profiler records (device kernels on CUDA)."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            function()
            self.synchronize()
        seen: dict[str, int] = {}
        for event in profiler.key_averages():
            name = event.key.lower()
            if not any(word in name for word in ("attention", "fmha", "flash", "sdpa")):
                continue
            kind = next((label for key, label in ATTENTION_KERNELS.items() if key in name), "other")
            seen[f"{kind}: {event.key[:90]}"] = event.count
        return seen

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()

    def capped(self, verdict: str, **kwargs) -> dict:
        """A layout under a memory cap: the plan agrees when "does not fit" meets an out-of-memory error and
        "fits" or "tight" runs through."""
        try:
            result = self.train(profile=False, count_syncs=False, **kwargs)
            result["out_of_memory"] = False
        except torch.OutOfMemoryError as error:
            result = {"out_of_memory": True, "message": str(error).splitlines()[0][:200]}
        result["plan_verdict"] = verdict
        result["plan_agrees"] = result["out_of_memory"] == (verdict == "does not fit")
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=420.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: exercises the code paths only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU visible; run with --cpu-smoke to exercise the code on CPU", file=sys.stderr)
        return 2
    bench = Bench(args)
    steps = 3 if args.cpu_smoke else args.steps
    print(f"device: {bench.name}, {bench.total_bytes / GIB:.1f} GiB, peak bf16 {bench.peak_tflops} TFLOPS, "
          f"torch {torch.__version__}")
    if bench.cuda:
        print("\n".join(bench.plan(bench.total_bytes / GIB).lines()))

    bench.run_check("eager", 60, bench.train, steps=steps)
    if bench.cuda:
        for gib in (USABLE_GIB[40], USABLE_GIB[24]):
            bench.run_check(f"cap_{gib:g}GiB", 40, bench.capped, verdict=bench.plan(gib).verdict, steps=4, cap_gib=gib)
        smallest = bench.plan(USABLE_GIB[24], micro_batch=1, accumulation=bench.accumulation * bench.micro_batch,
                              activation_checkpointing=True)
        bench.run_check(f"cap_{USABLE_GIB[24]:g}GiB_checkpointed_micro1", 40, bench.capped, verdict=smallest.verdict,
                        steps=4, cap_gib=USABLE_GIB[24], micro_batch=1, checkpointing=True)
    bench.run_check("eager_foreach_adamw", 45, bench.train, steps=max(3, steps // 2), fused=False, profile=False)
    bench.run_check("eager_transformers_sdpa", 40, bench.train, steps=4, attn="sdpa", count_syncs=True)
    bench.run_check("compiled", 200, bench.train, steps=steps, compile_model=True)
    bench.run_check("compiled_checkpointed", 200, bench.train, steps=max(4, steps // 2), compile_model=True,
                    checkpointing=True)

    summary = {"device": bench.name, "torch": torch.__version__, "checks": bench.results}
    print("summary " + json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    failed = [name for name, result in bench.results.items() if "error" in result]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
