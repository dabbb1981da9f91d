"""The device line every benchmark result records, and the bf16 peak used for MFU (one place for all scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: Peak dense bf16 FLOP/s per accelerator (vendor data sheets), matched by substring of the device name.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "A10": 125e12, "910B": 320e12}


def accelerator_name() -> str | None:
    """Name of the first CUDA or Ascend NPU device, or None on a CPU-only machine."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        import torch_npu  # noqa: F401

        if torch.npu.is_available():
            return torch.npu.get_device_name(0)
    except ImportError:
        pass
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def describe_device(device: str = "auto") -> str:
    """E.g. ``GPU: NVIDIA H100 80GB HBM3 x1, torch 2.13.0`` or ``CPU: AMD EPYC ..., 2-core x86_64 (no GPU), torch
    2.13.0+cpu with 1 threads``. ``device="cpu"`` describes the CPU even where an accelerator exists."""
    import torch

    name = accelerator_name() if device != "cpu" else None
    if name is not None:
        kind = "NPU" if "Ascend" in name or "910" in name else "GPU"
        count = torch.cuda.device_count() if kind == "GPU" else 1
        return f"{kind}: {name} x{count}, torch {torch.__version__}"
    return (f"CPU: {cpu_model()}, {os.cpu_count()}-core {platform.machine()} (no GPU), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads")


def peak_bf16_flops(name: str | None) -> float | None:
    """Dense bf16 peak of the named accelerator, or None when unknown (MFU is then not reported)."""
    if not name:
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
