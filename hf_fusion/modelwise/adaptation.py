"""Test-time adaptation shared by AdaMerging and WEMoE: minimise the prediction entropy of every task's network on
unlabelled test batches, one Adam step per round over all tasks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_fusion.modelwise.base import ModelwiseContext, seeded
from hf_fusion.modelwise.data import TrainingParams, entropy, random_batches
from hf_fusion.progress import check_stop, progress_bar


def adapt(
    context: ModelwiseContext, backbone: nn.Module, trainable: list[nn.Parameter], params: TrainingParams, desc: str
) -> list[float]:
    """Runs ``params.steps`` Adam steps on ``trainable``; returns the summed entropy of each step."""
    if params.steps == 0:
        return []
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
    streams = [random_batches(ev, params.batch_size, generator) for ev in evaluators]
    optimizer = torch.optim.Adam(trainable, lr=params.lr)
    losses: list[float] = []
    with progress_bar(total=params.steps, desc=desc, unit="step", disable=not context.show_progress) as bar:
        for _ in range(params.steps):
            check_stop()
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for evaluator, network, stream in zip(evaluators, networks, streams):
                loss = entropy(evaluator.logits(network, next(stream)))
                loss.backward()  # per task, so only one task's activations are alive at a time
                total += float(loss.detach())
            optimizer.step()
            losses.append(total)
            bar.update(1)
            bar.set_postfix(entropy=f"{total:.4f}")
    for p in trainable:
        p.requires_grad_(False)
    return losses


def describe(losses: list[float]) -> dict[str, Any]:
    return {
        "steps": len(losses),
        "first_entropy": losses[0] if losses else None,
        "last_entropy": losses[-1] if losses else None,
    }
