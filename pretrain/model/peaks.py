"""Dense peak FLOP/s of known GPUs, for MFU: an exact table, and no figure rather than a neighbour's for an unknown card."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakTflops:
    """Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets; None where the GPU has no such unit."""

    bf16: float | None
    fp16: float
    tf32: float | None  # what fp32 matmuls reach with TF32 allowed; Volta and older have none
    fp32: float


# (pattern, GPU, peaks). The pattern is matched with re.fullmatch against the name torch.cuda.get_device_name
# reports, upper-cased and stripped of "NVIDIA ", "TESLA ", "GEFORCE "; the first rule that matches wins, so
# variants come before their family. Whole-token patterns keep "L4" from matching "L40S" and "A10" from "A100".
_H100_SXM = PeakTflops(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)
_H100_PCIE = PeakTflops(bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.2)
_H100_NVL = PeakTflops(bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)
_A100 = PeakTflops(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)  # 40 GB and 80 GB, SXM and PCIe alike
PEAK_TABLE: tuple[tuple[str, str, PeakTflops], ...] = (
    (r"H100 NVL.*", "H100 NVL", _H100_NVL),
    (r"H100[ -]PCIE.*", "H100 PCIe", _H100_PCIE),
    (r"H100\b.*", "H100 SXM", _H100_SXM),  # "H100 80GB HBM3", "H100 SXM5 80GB"
    (r"H800[ -]PCIE.*", "H800 PCIe", _H100_PCIE),
    (r"H800\b.*", "H800 SXM", _H100_SXM),
    (r"H200 NVL.*", "H200 NVL", _H100_NVL),
    (r"G?H200\b.*", "H200 SXM", _H100_SXM),  # same tensor cores as H100 SXM, more and faster memory
    (r"A100\b.*", "A100", _A100),  # "A100-SXM4-40GB", "A100-SXM4-80GB", "A100-PCIE-40GB", "A100 80GB PCIE"
    (r"A800\b.*", "A800", _A100),
    (r"L40S\b.*", "L40S", PeakTflops(bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6)),
    (r"L40\b.*", "L40", PeakTflops(bf16=181.05, fp16=181.05, tf32=90.5, fp32=90.5)),
    (r"L4\b.*", "L4", PeakTflops(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    # AWS publishes no A10G datasheet; this is NVIDIA's A10 figure (A10G runs at similar clocks): set
    # --peak-tflops-per-device for an exact MFU.
    (r"A10G\b.*", "A10G", PeakTflops(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),
    (r"A10\b.*", "A10", PeakTflops(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),
    (r"RTX A6000\b.*", "RTX A6000", PeakTflops(bf16=154.8, fp16=154.8, tf32=77.4, fp32=38.7)),
    # GeForce cards run fp16/bf16 matmuls with fp32 accumulation at half the fp16-accumulate rate.
    (r"RTX 4090", "RTX 4090", PeakTflops(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6)),
    (r"V100S\b.*", "V100S", PeakTflops(bf16=None, fp16=130.0, tf32=None, fp32=16.4)),
    (r"V100[ -]PCIE.*", "V100 PCIe", PeakTflops(bf16=None, fp16=112.0, tf32=None, fp32=14.0)),
    (r"V100\b.*", "V100 SXM2", PeakTflops(bf16=None, fp16=125.0, tf32=None, fp32=15.7)),
    (r"T4\b.*", "T4", PeakTflops(bf16=None, fp16=65.0, tf32=None, fp32=8.1)),
)


def gpu_peak(device_name: str) -> tuple[str, PeakTflops] | None:
    """(GPU model, peaks) for a torch.cuda.get_device_name string; None for a GPU not in the table."""
    name = device_name.upper().strip()
    for prefix in ("NVIDIA ", "TESLA ", "GEFORCE "):
        name = name.removeprefix(prefix)
    for pattern, gpu, peaks in PEAK_TABLE:
        if re.fullmatch(pattern, name):
            return gpu, peaks
    return None


def peak_tflops_for_name(device_name: str, mixed_precision: str = "bf16") -> float | None:
    """The dense peak for the precision the matmuls run in: bf16, fp16 (also for bf16 on GPUs without it, as the
    loop falls back to fp16 there), or "no" (fp32 weights: the TF32 peak where the GPU has TF32, else fp32)."""
    found = gpu_peak(device_name)
    if found is None:
        return None
    peaks = found[1]
    if mixed_precision == "bf16":
        return peaks.bf16 if peaks.bf16 is not None else peaks.fp16
    if mixed_precision == "fp16":
        return peaks.fp16
    return peaks.tf32 if peaks.tf32 is not None else peaks.fp32


def peak_flops_per_device(
    device: torch.device, configured_tflops: float, mixed_precision: str = "bf16"
) -> float | None:
    """FLOP/s for MFU: the configured figure, else the table's; None (no MFU rather than a guess) when unknown."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_tflops_for_name(torch.cuda.get_device_name(device), mixed_precision)
    return tflops * 1e12 if tflops is not None else None
