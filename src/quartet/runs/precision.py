"""Mixed precision: Quartet's own bf16 switch, and a warning where it would only be emulated."""

from __future__ import annotations

import contextlib
import functools
import sys

import torch


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast when asked for and supported; otherwise a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16 is set but this GPU does not support bfloat16")
    if device.type == "cpu":
        _warn_if_cpu_bf16_is_emulated()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def _warn_if_cpu_bf16_is_emulated() -> None:
    """Once per process: bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated, and slow."""
    if not cpu_has_native_bf16():
        print("warning: bf16 is set but this CPU has no native bf16 matrix products; autocast emulates "
              "them (a PPO step measured about 65x slower than fp32 on an AVX2 CPU). Turn bf16 off here.",
              file=sys.stderr)
