"""A check that catches on a CPU what would break on CUDA: a tensor made without the model's device.

On a CPU machine every tensor lands on the CPU, so a factory call without `device=` (or a CPU
`torch.Generator` handed to one) works here and fails, or silently runs on the host, under CUDA.
`DeviceDiscipline(device, roots)` is a TorchFunctionMode that records every factory call made
from a file under `roots` (torch's own internals are not the project's) that names no device or
another device than `device`, and every call that mixes tensors of two devices."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch.overrides import TorchFunctionMode

FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.rand, torch.randn, torch.randint,
             torch.randperm, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.tensor,
             torch.as_tensor, torch.normal, torch.bernoulli, torch.multinomial}
NEEDS_NO_DEVICE = {torch.bernoulli, torch.multinomial, torch.normal}   # these follow their tensor argument


@dataclass
class Violation:
    where: str
    what: str


def _caller(roots: tuple[Path, ...]) -> str | None:
    """file:line of the frame that called the torch function, when it is under `roots` (a module's
    own parameters, made by torch.nn on the CPU and then moved, are torch's business, not a call here)."""
    frame = sys._getframe(2)
    while frame is not None and (Path(frame.f_code.co_filename) == Path(__file__)
                                 or frame.f_code.co_filename.endswith(("torch/overrides.py", "torch/utils/_device.py"))):
        frame = frame.f_back
    if frame is None:
        return None
    resolved = Path(frame.f_code.co_filename).resolve()
    if any(root == resolved or root in resolved.parents for root in roots):
        return f"{resolved.name}:{frame.f_lineno}"
    return None


def _devices(values: Iterable) -> set[torch.device]:
    found = set()
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:   # 0-d tensors may mix (PyTorch allows it)
            found.add(value.device)
        elif isinstance(value, (list, tuple)):
            found |= _devices(value)
    return found


class DeviceDiscipline(TorchFunctionMode):
    def __init__(self, device: torch.device | str, roots: Iterable[str | Path]) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.roots = tuple(Path(r).resolve() for r in roots)
        self.violations: list[Violation] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and func not in NEEDS_NO_DEVICE:
            where = _caller(self.roots)
            if where is not None:
                device = kwargs.get("device")
                if device is None:
                    self.violations.append(Violation(where, f"{func.__name__}() without device="))
                elif torch.device(device).type != self.device.type:
                    self.violations.append(Violation(where, f"{func.__name__}() on {device}, not {self.device}"))
                generator = kwargs.get("generator")
                if generator is not None and generator.device.type != self.device.type:
                    self.violations.append(Violation(where, f"{func.__name__}() with a {generator.device} generator"))
        else:
            devices = _devices(list(args) + list(kwargs.values()))
            if len({d.type for d in devices}) > 1:
                where = _caller(self.roots)
                if where is not None:
                    self.violations.append(Violation(where, f"{getattr(func, '__name__', func)} mixes {sorted(map(str, devices))}"))
        return func(*args, **kwargs)
