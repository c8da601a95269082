"""Which low precision pays on a device: the "auto" choice of the profiles.

The paper trains in fp16 on V100s (section 2.4). On today's GPUs bf16 needs no loss
scaling; on a CPU a bf16 matmul only pays where the CPU has bf16 matrix
instructions (AVX-512 BF16 or AMX): there oneDNN runs it at ~4x the fp32 rate
(measured here: 857 vs 200 GFLOP/s on 2 threads); elsewhere it converts to fp32
and is slower than plain fp32. So "auto" means:

    CUDA with bf16 (Ampere and later)   bf16
    CUDA without                        fp16 (the paper's, with its gradient scaling)
    CPU with AVX-512 BF16 / AMX         bf16
    any other CPU / device              fp32

`DALLE_CPU_BF16=0|1` overrides the CPU detection (a CPU whose flags the check
cannot read, or a comparison run).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess

import torch

CPU_BF16_ENV = "DALLE_CPU_BF16"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin":  # Apple silicon M2 and later have BF16 instructions
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5)
            if out.stdout.strip() == "1":
                return frozenset({"arm_bf16"})
        except (OSError, subprocess.SubprocessError):
            pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (or DALLE_CPU_BF16=1)."""
    env = os.environ.get(CPU_BF16_ENV)
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    return bool(_cpu_flags() & {*CPU_BF16_FLAGS, "arm_bf16"})


def fast_low_precision(device: torch.device | str) -> str:
    """"bf16", "fp16" or "fp32": the autocast dtype that pays on `device` (module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def resolve_amp_dtype(amp_dtype: str, device: torch.device | str) -> str:
    """A config's amp_dtype with "auto" resolved for `device`; other values unchanged."""
    return fast_low_precision(device) if amp_dtype == "auto" else amp_dtype


__all__ = ["CPU_BF16_ENV", "cpu_has_fast_bf16", "fast_low_precision", "resolve_amp_dtype"]
