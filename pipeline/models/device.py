"""Where a model runs and in which dtype: the device, and bf16 only where the hardware runs it natively."""
from __future__ import annotations

import os

import torch

from pipeline.errors import TeacherError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NATIVE_BF16_ENV = "DISTILLERY_NATIVE_BF16"
"""``0`` or ``1`` overrides the bf16 capability check (the test suite sets 0, so it computes alike on every CPU)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks the local rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"device {name!r} was requested but CUDA is not available; use device=cpu or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware: a CUDA GPU with bf16 (Ampere or newer), or a CPU with
    AVX-512-BF16 or AMX. Elsewhere bf16 is emulated: on an AVX2-only EPYC a teacher pass ran 4x slower than fp32."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def compute_dtype(requested: str, device: torch.device, allow_fp16: bool = True) -> str:
    """The dtype name to compute in: ``requested`` itself unless it is ``auto``, which picks bf16 where
    ``device`` runs it natively, else fp16 on a GPU (when ``allow_fp16``) and fp32 on a CPU."""
    if requested != "auto":
        return requested
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" and allow_fp16 else "fp32"


def dtype_choice(requested: str, chosen: str, device: torch.device) -> str:
    """``chosen`` with why, for the log: ``fp32 (auto: no native bf16 on CPU (AVX2))``. Callers log it once the
    model is ready, so that a job refused earlier prints its one error line and nothing else."""
    if requested != "auto":
        return f"{chosen} (as set)"
    why = {"bf16": "native bf16", "fp16": "this GPU has no bf16"}.get(chosen, "no native bf16")
    return f"{chosen} (auto: {why} on {device_description(device)})"


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's torch capability level (AVX2, AVX512, ...)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.backends.cpu.get_cpu_capability()})"
