"""Test-time adaptation shared by AdaMerging and WEMoE: minimise the prediction entropy of every task's network on
unlabelled test batches, one Adam step per round over all tasks.

Under several processes the batches are global: every process draws the same seeded batch of every task at every
step, computes the entropy of its share of the batch's examples weighted by its share of the batch's logit rows
(:func:`~hf_fusion.modelwise.data.entropy_share`) and backpropagates it; the gradients, summed over the processes,
are then those of one process on the whole batch, and every process takes the same optimiser step. So the result is
one process's, up to float rounding, whatever the number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_fusion.modelwise.base import ModelwiseContext, seeded
from hf_fusion.modelwise.data import TrainingParams, entropy_share, logit_rows, random_rows
from hf_fusion.progress import check_stop, progress_bar
from hf_fusion.runtime import Runtime, autocast


def adapt(
    context: ModelwiseContext, backbone: nn.Module, trainable: list[nn.Parameter], params: TrainingParams, desc: str
) -> list[float]:
    """Runs ``params.steps`` Adam steps on ``trainable``; returns the summed entropy of each step (every task's
    mean entropy on its whole batch, added over tasks).

    The processes' gradients are summed by hand (:func:`sum_gradients`, one all-reduce per step) rather than by
    wrapping a network in ``DistributedDataParallel``: the trainable parameters are a few coefficients or routers
    shared by several task networks, each run and backpropagated in turn, and DDP wraps one module whose own
    parameters it synchronises after each backward pass. One all-reduce of the trainable gradients before each
    optimiser step is what DDP would do here, without a wrapper per task network or a reduction per task.
    """
    if params.steps == 0:
        return []
    runtime = context.runtime
    evaluators = [
        context.evaluator(i, calibration=False, limit=None, batch_size=params.batch_size)
        for i in range(context.num_models)
    ]
    networks = [ev.task_network(backbone) for ev in evaluators]
    for network in networks:
        network.eval()
        for p in network.parameters():
            p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    generator = seeded(params.seed)
    streams = [random_rows(len(ev.data), params.batch_size, generator) for ev in evaluators]
    optimizer = torch.optim.Adam(trainable, lr=params.lr)
    # fp16 gradients can underflow: the loss is scaled, and a step whose (summed) gradients overflow is skipped
    scaler = _Unscaled() if context.mixed_precision != "fp16" else torch.amp.GradScaler(context.device.split(":")[0])
    losses: list[float] = []
    with progress_bar(total=params.steps, desc=desc, unit="step", disable=not context.show_progress) as bar:
        for _ in range(params.steps):
            check_stop()
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=context.device)
            for evaluator, network, stream in zip(evaluators, networks, streams):
                # per task, so only one task's activations are alive at a time
                total += backward_share(context, evaluator, network, runtime.mine(next(stream)), scaler)
            total = sum_gradients(trainable, total, runtime)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(total))
            bar.update(1)
            bar.set_postfix(entropy=f"{losses[-1]:.4f}")
    for p in trainable:
        p.requires_grad_(False)
    return losses


def backward_share(
    context: ModelwiseContext, evaluator: Any, network: nn.Module, rows: list[int], scaler: Any
) -> torch.Tensor:
    """Backpropagates this process's part of one task's batch entropy (its examples ``rows``); returns that part."""
    logits = None
    if rows:
        with autocast(context.device, context.mixed_precision):
            logits = evaluator.logits(network, evaluator.encode(evaluator.data[rows]))
    local = logit_rows(logits) if logits is not None else 0
    total_rows = int(context.runtime.sum_(torch.tensor([local], device=context.device)).item())
    if logits is None:  # a process with no example of this batch still steps with the others
        return scaler.scale(torch.zeros((), device=context.device))
    loss = entropy_share(logits, total_rows)
    scaler.scale(loss).backward()
    return loss.detach()


class _Unscaled:
    """The scaler of full-precision and bf16 steps: the loss as it is, a plain optimiser step."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass


def sum_gradients(trainable: list[nn.Parameter], loss: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Adds the gradients of ``trainable``, and ``loss``, over the processes: one all-reduce of one flat buffer;
    returns the summed loss. A process that had no example of any task adds zeros."""
    if not runtime.distributed:
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), loss.reshape(1).float()])
    runtime.sum_(flat)
    offset = 0
    for p in trainable:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    return flat[-1]


def describe(losses: list[float]) -> dict[str, Any]:
    return {
        "steps": len(losses),
        "first_entropy": losses[0] if losses else None,
        "last_entropy": losses[-1] if losses else None,
    }
