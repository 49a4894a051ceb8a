"""Multi-task signals: each task's gradient on the shared parameters and their cosines."""

from __future__ import annotations

import itertools
from typing import Any

import torch


class TaskProbe:
    """Measures each task loss's gradient on the shared parameters.

    For a task t with loss L_t, weight w_t and shared parameters theta,
    g_t = d(w_t L_t)/dtheta flattened into one vector. `grad_norm` is ||g_t||_2 and `cosine` is
    <g_a, g_b> / (||g_a|| ||g_b||) for each pair of tasks. The gradients come from
    `torch.autograd.grad(..., retain_graph=True)`, so the probe must run while the losses
    still hold their graph (before `backward`, or after `backward(retain_graph=True)`),
    and it costs one extra backward pass through the shared layers per task.
    """

    def __init__(self, shared: list[torch.nn.Parameter]) -> None:
        self.shared = [param for param in shared if param.requires_grad]

    def measure(self, losses: dict[str, torch.Tensor],
                weights: dict[str, float]) -> tuple[list[dict], list[dict]]:
        """Return task rows and task-pair rows for one step.

        Each loss is multiplied by its weight (1 where none is given) first, so the norms
        are those of the gradients that the tasks really send into the shared layers.
        """
        flat: dict[str, torch.Tensor] = {}
        for task, loss in losses.items():
            weighted = loss * float(weights.get(task, 1.0))
            grads = torch.autograd.grad(weighted, self.shared, retain_graph=True,
                                        allow_unused=True)
            flat[task] = torch.cat([
                (grad if grad is not None else torch.zeros_like(param)).reshape(-1).float()
                for grad, param in zip(grads, self.shared)
            ])
        norms = {task: torch.linalg.vector_norm(vector) for task, vector in flat.items()}
        task_rows = [{"task": task, "grad_norm": norm} for task, norm in norms.items()]
        pair_rows: list[dict[str, Any]] = []
        for first, second in itertools.permutations(flat, 2):
            denominator = (norms[first] * norms[second]).clamp_min(1e-30)
            cosine = torch.dot(flat[first], flat[second]) / denominator
            pair_rows.append({"task": first, "other_task": second, "cosine": cosine})
        return task_rows, pair_rows
