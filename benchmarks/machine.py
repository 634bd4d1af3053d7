"""What machine a run was on, and a stable id for it (the key of its section in docs/benchmarks.md).

The id hashes the CPU model, core count, RAM (whole GiB), GPU name and torch version: the things that change
the figures. It needs no psutil, so it works on a lent GPU machine with a bare image.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    cores: int
    ram_gib: int
    gpu: str  # "none", or the device name (with a count when there are several)
    torch: str
    transformers: str
    python: str

    @property
    def machine_id(self) -> str:
        return machine_id(self)

    @property
    def label(self) -> str:
        gpu = "no GPU" if self.gpu == "none" else self.gpu
        return f"{self.cpu_model}, {self.cores} cores, {self.ram_gib} GiB RAM, {gpu}"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "machine_id": self.machine_id}


def machine_id(info: MachineInfo) -> str:
    material = "|".join([info.cpu_model, str(info.cores), str(info.ram_gib), info.gpu, info.torch])
    return hashlib.sha256(material.encode()).hexdigest()[:12]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def ram_gib() -> int:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError, AttributeError):
        return 0


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none"
    n = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    return name if n == 1 else f"{n} x {name}"


def machine_info() -> MachineInfo:
    import torch
    import transformers

    return MachineInfo(cpu_model=cpu_model(), cores=os.cpu_count() or 1, ram_gib=ram_gib(), gpu=gpu_name(),
                       torch=torch.__version__, transformers=transformers.__version__,
                       python=platform.python_version())
