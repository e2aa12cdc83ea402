"""Data-parallel DHBE: K processes play one game, each on a slice of the batch one process would draw.

Every process holds the same T, S, G and Gp (same seed, same state) and draws the same whole-batch
latents from the same generators. In the game's iterations the networks whose cost grows with the
batch (G, T, S) run on this process's slice (`shard`); cheap whole-batch work (Gp's patches, the
pastes and blends, the extensions' random draws) runs on the whole batch in every process, so every
extension sees what one process would see. After each backward, S's, G's and Gp's gradients are
averaged over the processes; S's and G's batch-norm layers take their statistics over the whole
batch (`SynchronisedBatchNorm`: an all-reduce of per-channel sums, differentiable, because torch's
SyncBatchNorm refuses CPU tensors); priors over the batch (G's class balance, its statistics at T's
batch-norm layers) use `mean`. With equal slices and losses that are means over samples, the
averaged gradient is the one-process gradient: tests/test_data_parallel.py runs 2 CPU processes
against one with the whole batch.

Everything outside the iterations (the probes, the searches between epochs, the diagnostics, an
extension's own copy of G) runs `replicated`: the whole batch in every process, no collective, the
same answer everywhere. torch.distributed only (gloo on CPU, nccl on CUDA); no Ray here.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed
from torch import nn

from defense.spec import require


def require_even_split(batch_size: int, workers: int) -> None:
    """Each of `workers` processes plays an equal slice of the batch (the averaged gradients assume it)."""
    require(batch_size % workers == 0, f"batch_size ({batch_size}) must be a multiple of the number of workers "
                                       f"({workers}): each worker plays an equal slice of the batch")


class SingleProcess:
    """One process with the whole batch: every operation is the identity (the official game)."""

    rank, world = 0, 1

    @property
    def active(self) -> bool:
        return False

    def check_batch(self, batch_size: int) -> None: ...

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def gather(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def mean(self, values: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        """Mean over `dims` (the sample dimension 0 among them) of the whole batch."""
        return values.mean(dim=tuple(dims))

    def mean_and_variance(self, values: torch.Tensor, dims: Sequence[int],
                          shift: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and biased variance over `dims` of the whole batch (`shift`: see DataParallel)."""
        return values.mean(dim=tuple(dims)), values.var(dim=tuple(dims), unbiased=False)

    def average_gradients(self, module: nn.Module) -> None: ...

    def average(self, values: Sequence[float]) -> tuple[float, ...]:
        return tuple(values)

    def any(self, flag: bool) -> bool:
        """True in every process when it is true in one (a decision taken on a process's own clock)."""
        return flag

    @contextlib.contextmanager
    def replicated(self) -> Iterator[None]:
        yield

    def synchronise_batch_norm(self, *modules: nn.Module) -> None: ...


SINGLE_PROCESS = SingleProcess()


class DataParallel(SingleProcess):
    """This process's part in a torch.distributed group (already initialised, e.g. by Ray Train)."""

    def __init__(self, device: torch.device | str = "cpu", group=None) -> None:
        """`device`: where this process's models live (nccl reduces CUDA tensors only)."""
        import torch.distributed as dist

        require(dist.is_available() and dist.is_initialized(), "data-parallel DHBE needs an initialised process group")
        self.group, self.device = group, torch.device(device)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._replicated = False

    def __deepcopy__(self, memo: dict) -> "DataParallel":
        return self   # a copy of S (a checkpoint, a fallback) stays in the same process group

    @property
    def active(self) -> bool:
        return self.world > 1 and not self._replicated

    def check_batch(self, batch_size: int) -> None:
        require_even_split(batch_size, self.world)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return batch
        size = len(batch) // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def gather(self, batch: torch.Tensor) -> torch.Tensor:
        """The whole batch from every process's slice (no gradient: for detached samples)."""
        if not self.active:
            return batch
        batch = batch.detach().contiguous()
        slices = [torch.empty_like(batch) for _ in range(self.world)]
        torch.distributed.all_gather(slices, batch, group=self.group)
        return torch.cat(slices)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over processes, differentiable (its backward sums the gradients likewise)."""
        return _SumOverProcesses.apply(values, self.group) if self.active else values

    def mean(self, values: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        if not self.active:
            return values.mean(dim=tuple(dims))
        count = math.prod(values.shape[d] for d in dims) * self.world   # the slices are equal
        return self.sum(values.sum(dim=tuple(dims))) / count

    def mean_and_variance(self, values: torch.Tensor, dims: Sequence[int],
                          shift: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One all-reduce of the per-channel sums of (x - c) and (x - c)^2. `shift` c (the same in every
        process, e.g. the layer's running mean; none: 0) keeps E[(x-c)^2] - E[x-c]^2 from cancelling
        when the mean is far from 0 (float32 loses ~7 digits of mean^2 / variance)."""
        if not self.active:
            return super().mean_and_variance(values, dims)
        shape = [values.shape[d] if d not in dims else 1 for d in range(values.dim())]
        centred = values if shift is None else values - shift.detach().view(shape)
        count = math.prod(values.shape[d] for d in dims) * self.world
        sums = self.sum(torch.stack([centred.sum(dim=tuple(dims)), centred.pow(2).sum(dim=tuple(dims))])) / count
        mean_centred, second_moment = sums[0], sums[1]
        mean = mean_centred if shift is None else mean_centred + shift.detach()
        return mean, (second_moment - mean_centred.pow(2)).clamp_min(0)

    def average_gradients(self, module: nn.Module) -> None:
        """All-reduce a module's gradients, as DDP does (by hand: a DHBE step runs S twice, clean and
        patched, before one backward, and G and Gp step in the same iteration)."""
        if not self.active:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])   # one all-reduce per module, as DDP's buckets
        torch.distributed.all_reduce(flat, group=self.group)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def average(self, values: Sequence[float]) -> tuple[float, ...]:
        """The mean over processes of per-process means (the whole batch's mean; the slices are equal)."""
        if not self.active:
            return tuple(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, group=self.group)
        return tuple(float(v) / self.world for v in tensor)

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(tensor.item())

    @contextlib.contextmanager
    def replicated(self) -> Iterator[None]:
        """The whole batch in every process, no collective (identical inputs, identical answers)."""
        before, self._replicated = self._replicated, True
        try:
            yield
        finally:
            self._replicated = before

    def synchronise_batch_norm(self, *modules: nn.Module) -> None:
        """Replace the batch-norm layers of `modules` by ones whose training statistics are the whole
        batch's; parameters and buffers are the same objects (optimisers and state-dict keys stand)."""
        for module in modules:
            for parent in list(module.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SynchronisedBatchNorm):
                        setattr(parent, name, SynchronisedBatchNorm.taking_over(child, self))


class _SumOverProcesses(torch.autograd.Function):
    """y = the sum over processes of x; dL/dx = the sum over processes of dL/dy, because every
    process's loss depends on y (torch.distributed.nn.functional.all_reduce, deprecated in torch 2.13,
    and the functional collectives, whose autograd is private, do the same)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = values.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        total = gradient.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(total, group=ctx.group)
        return total, None


class SynchronisedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training-mode statistics are taken over every process's slice (one
    differentiable all-reduce of per-channel sums, shifted by the running mean); running statistics
    updated as torch's BatchNorm does, with the whole batch's count. In eval mode, or replicated, it
    is plain batch norm."""

    def __init__(self, *args, parallel: SingleProcess = SINGLE_PROCESS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.parallel = parallel

    @classmethod
    def taking_over(cls, layer: nn.modules.batchnorm._BatchNorm, parallel: SingleProcess) -> "SynchronisedBatchNorm":
        sync = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                   parallel=parallel, device=next(iter(layer.buffers()), torch.zeros(())).device)
        for name, parameter in layer.named_parameters(recurse=False):
            setattr(sync, name, parameter)
        for name, buffer in layer.named_buffers(recurse=False):
            setattr(sync, name, buffer)
        sync.train(layer.training)
        return sync

    def _check_input_dim(self, input: torch.Tensor) -> None:
        require(input.dim() >= 2, f"batch norm needs a batch of at least 2 dimensions, got {input.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or self.running_mean is None
        if not (use_batch and self.parallel.active):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean, var = self.parallel.mean_and_variance(x, dims, self.running_mean)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                count = math.prod(x.shape[d] for d in dims) * self.parallel.world
                unbiased = var.detach() * (count / max(count - 1, 1))
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * unbiased)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y
