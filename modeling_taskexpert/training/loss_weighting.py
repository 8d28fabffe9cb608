"""How task losses are combined into the training loss: fixed weights, uncertainty weighting, DWA."""

import math

import torch
from torch import nn


STRATEGIES = ("fixed", "uncertainty", "dwa")


class LossWeighting(nn.Module):
    """Combines per-task losses. `fixed` uses the model config's weights; the other strategies start from them.

    - fixed: L = sum_t w_t L_t.
    - uncertainty (Kendall, Gal & Cipolla, CVPR 2018): L = sum_t w_t (exp(-s_t) L_t + s_t) with a learned
      s_t = log sigma_t^2 per task (initialised at 0, so training starts at the fixed weights).
    - dwa (Liu, Johns & Davison, CVPR 2019): w_t = T exp(r_t / tau) / sum_i exp(r_i / tau) scaled by the fixed
      weight, with r_t the ratio of the task's mean loss over the last window of steps to the window before it
      (windows replace the paper's epochs, so runs of any length behave alike). Until two windows exist, r_t = 1.

    The module's state (learned s_t, DWA history) is part of training checkpoints.
    """

    def __init__(self, tasks: list[str], base_weights: dict[str, float], strategy: str = "fixed",
                 dwa_temperature: float = 2.0, dwa_window: int = 50):  # fmt: skip
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"Loss weighting must be one of {STRATEGIES}, got {strategy!r}.")
        for task in tasks:
            if task not in base_weights:
                raise ValueError(f"`loss_weights` has no weight for task {task!r} (it has {sorted(base_weights)}).")
            weight = base_weights[task]
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight < 0
            ):
                raise ValueError(f"`loss_weights[{task!r}]` must be a finite number >= 0, got {weight!r}.")
        if not math.isfinite(dwa_temperature) or dwa_temperature <= 0:
            raise ValueError(f"`dwa_temperature` must be a finite number > 0, got {dwa_temperature!r}.")
        if dwa_window < 1:
            raise ValueError(f"`dwa_window` must be >= 1, got {dwa_window!r}.")
        self.tasks = list(tasks)
        self.strategy = strategy
        self.register_buffer("base_weights", torch.tensor([float(base_weights[t]) for t in self.tasks]))
        self.log_variances = nn.Parameter(torch.zeros(len(self.tasks))) if strategy == "uncertainty" else None
        self.temperature, self.window = dwa_temperature, dwa_window
        # DWA history: running sums of the current window and the mean losses of the last two windows.
        self.register_buffer("window_sums", torch.zeros(len(self.tasks)))
        self.register_buffer("window_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_means", torch.full((2, len(self.tasks)), float("nan")))

    def current_weights(self) -> torch.Tensor:
        """The weights applied to the task losses at this step (without the uncertainty regulariser)."""
        if self.strategy == "uncertainty":
            return self.base_weights * torch.exp(-self.log_variances.detach())
        if self.strategy == "dwa" and not torch.isnan(self.window_means).any():
            ratios = self.window_means[1] / self.window_means[0].clamp(min=1e-12)
            soft = torch.softmax(ratios / self.temperature, dim=0) * len(self.tasks)
            return self.base_weights * soft
        return self.base_weights

    def forward(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        present = [i for i, task in enumerate(self.tasks) if task in task_losses]
        if not present:
            raise ValueError(f"No task loss to weight; expected some of {self.tasks}.")
        losses = torch.stack([task_losses[self.tasks[i]].float() for i in present])
        index = torch.tensor(present, device=losses.device)
        if self.strategy == "uncertainty":
            log_var = self.log_variances[index]
            return (self.base_weights[index] * (torch.exp(-log_var) * losses + log_var)).sum()
        total = (self.current_weights()[index] * losses).sum()
        if self.strategy == "dwa" and self.training:
            self._record(index, losses.detach())
        return total

    def _record(self, index: torch.Tensor, losses: torch.Tensor) -> None:
        self.window_sums[index] += losses
        self.window_count += 1
        if int(self.window_count) >= self.window:
            self.window_means[0] = self.window_means[1]
            self.window_means[1] = self.window_sums / self.window_count
            self.window_sums.zero_()
            self.window_count.zero_()

    def synchronize_gradients(self, accelerator) -> None:
        """Average the learned weights' gradients over processes (this module is not wrapped in DDP)."""
        if self.log_variances is not None and self.log_variances.grad is not None and accelerator.num_processes > 1:
            self.log_variances.grad = accelerator.reduce(self.log_variances.grad, reduction="mean")

    def describe(self) -> dict[str, float]:
        return {f"weight/{task}": float(w) for task, w in zip(self.tasks, self.current_weights())}


__all__ = ["LossWeighting"]
