"""How task losses are combined into the loss a dense multi-task model returns: one class per strategy behind
`LossWeighting`.

A model combines its task losses with `FixedWeighting(config.loss_weights)` unless its `forward` is given another
weighting (`loss_weighting=`); `train.py` builds the recipe's strategy with `build_loss_weighting` and passes it, so the
loss a model returns is the loss training minimises. Every strategy starts from the config's weights w_t:

- `fixed`: L = sum_t w_t L_t.
- `uncertainty` (Kendall, Gal & Cipolla, CVPR 2018): L = sum_t w_t (exp(-s_t) L_t + s_t) with a learned
  s_t = log sigma_t^2 per task (initialised at 0, so training starts at the fixed weights).
- `dwa` (Liu, Johns & Davison, CVPR 2019): w_t T exp(r_t / tau) / sum_i exp(r_i / tau), with r_t the ratio of the
  task's mean loss over the last window of steps to the window before it (windows replace the paper's epochs, so runs
  of any length behave alike). Until two windows exist, r_t = 1.

A weighting's state (learned s_t, DWA history) is part of training checkpoints.
"""

import math

import torch
from torch import nn

from .configuration_common import check_number


class LossWeighting(nn.Module):
    """Base of the strategies: the tasks, their base weights (validated), and the interface `forward(task_losses)` ->
    total loss over the tasks present, `current_weights()`, `describe()` and `synchronize_gradients(accelerator)`."""

    name = "base"

    def __init__(self, tasks: list[str], base_weights: dict[str, float]):
        super().__init__()
        for task in tasks:
            if task not in base_weights:
                raise ValueError(f"`loss_weights` has no weight for task {task!r} (it has {sorted(base_weights)}).")
            check_number(f"loss_weights[{task!r}]", base_weights[task], minimum=0.0)
        self.tasks = list(tasks)
        self.register_buffer("base_weights", torch.tensor([float(base_weights[t]) for t in self.tasks]))

    def current_weights(self) -> torch.Tensor:
        """The weights applied to the task losses at this step (without a strategy's regulariser)."""
        return self.base_weights

    def forward(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define how it combines the task losses (`forward`).")

    def _present(self, task_losses: dict[str, torch.Tensor]) -> list[int]:
        present = [i for i, task in enumerate(self.tasks) if task in task_losses]
        if not present:
            raise ValueError(f"No task loss to weight; expected some of {self.tasks}.")
        unknown = [task for task in task_losses if task not in self.tasks]
        if unknown:
            raise ValueError(f"Task loss(es) {unknown} have no weight; the weighting knows {self.tasks}.")
        return present

    def synchronize_gradients(self, accelerator) -> None:
        """Average learned weights' gradients over processes (a weighting is not wrapped in DDP); nothing to do for a
        strategy without parameters."""

    def describe(self) -> dict[str, float]:
        return {f"weight/{task}": float(w) for task, w in zip(self.tasks, self.current_weights())}


def weighted_sum(task_losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_t weights[t] * task_losses[t], summed in the order of `task_losses` (the arithmetic the models have always
    used for their default loss, kept bit for bit)."""
    reference = next(iter(task_losses.values()))
    return sum((weights[task] * value for task, value in task_losses.items()), reference.new_zeros(()))


class FixedWeighting(LossWeighting):
    """L = sum_t w_t L_t (`weighted_sum`): a model's loss when its `forward` is given no weighting."""

    name = "fixed"

    def forward(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        self._present(task_losses)
        return weighted_sum(task_losses, dict(zip(self.tasks, self.base_weights.tolist())))


class UncertaintyWeighting(LossWeighting):
    """L = sum_t w_t (exp(-s_t) L_t + s_t), s_t learned (initialised at 0)."""

    name = "uncertainty"

    def __init__(self, tasks: list[str], base_weights: dict[str, float]):
        super().__init__(tasks, base_weights)
        self.log_variances = nn.Parameter(torch.zeros(len(self.tasks)))

    def current_weights(self) -> torch.Tensor:
        return self.base_weights * torch.exp(-self.log_variances.detach())

    def forward(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        present = self._present(task_losses)
        losses = torch.stack([task_losses[self.tasks[i]].float() for i in present])
        index = torch.tensor(present, device=losses.device)
        log_var = self.log_variances[index]
        return (self.base_weights[index] * (torch.exp(-log_var) * losses + log_var)).sum()

    def synchronize_gradients(self, accelerator) -> None:
        if self.log_variances.grad is not None and accelerator.num_processes > 1:
            self.log_variances.grad = accelerator.reduce(self.log_variances.grad, reduction="mean")


class DynamicWeightAverage(LossWeighting):
    """w_t scaled by T softmax(r / tau), r_t the ratio of the task's last two window means (1 until two exist)."""

    name = "dwa"

    def __init__(self, tasks: list[str], base_weights: dict[str, float], temperature: float = 2.0, window: int = 50):
        super().__init__(tasks, base_weights)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"`dwa_temperature` must be a finite number > 0, got {temperature!r}.")
        if window < 1:
            raise ValueError(f"`dwa_window` must be >= 1, got {window!r}.")
        self.temperature, self.window = temperature, window
        # History: running sums of the current window and the mean losses of the last two windows.
        self.register_buffer("window_sums", torch.zeros(len(self.tasks)))
        self.register_buffer("window_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_means", torch.full((2, len(self.tasks)), float("nan")))

    def current_weights(self) -> torch.Tensor:
        if torch.isnan(self.window_means).any():
            return self.base_weights
        ratios = self.window_means[1] / self.window_means[0].clamp(min=1e-12)
        return self.base_weights * torch.softmax(ratios / self.temperature, dim=0) * len(self.tasks)

    def forward(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        present = self._present(task_losses)
        losses = torch.stack([task_losses[self.tasks[i]].float() for i in present])
        index = torch.tensor(present, device=losses.device)
        total = (self.current_weights()[index] * losses).sum()
        if self.training:
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


LOSS_WEIGHTINGS = {cls.name: cls for cls in (FixedWeighting, UncertaintyWeighting, DynamicWeightAverage)}
STRATEGIES = tuple(LOSS_WEIGHTINGS)


def build_loss_weighting(
    strategy: str,
    tasks: list[str],
    base_weights: dict[str, float],
    dwa_temperature: float = 2.0,
    dwa_window: int = 50,
) -> LossWeighting:
    """The weighting of `strategy` ("fixed", "uncertainty" or "dwa") over `tasks`, starting from `base_weights`."""
    if strategy not in LOSS_WEIGHTINGS:
        raise ValueError(f"Loss weighting must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "dwa":
        return DynamicWeightAverage(tasks, base_weights, dwa_temperature, dwa_window)
    return LOSS_WEIGHTINGS[strategy](tasks, base_weights)


__all__ = [
    "LossWeighting",
    "FixedWeighting",
    "UncertaintyWeighting",
    "DynamicWeightAverage",
    "LOSS_WEIGHTINGS",
    "STRATEGIES",
    "build_loss_weighting",
]
