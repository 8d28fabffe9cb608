"""Learning-rate schedules of the training recipes, as `torch.optim.lr_scheduler.LambdaLR` factors."""

import math


def poly_schedule(warmup_steps: int, max_steps: int, power: float):
    """LambdaLR factor: linear warm-up to 1, then (1 - t / T)^power down to 0 (the protocol's poly schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - step / max_steps) ** power

    return factor


def cosine_schedule(warmup_steps: int, max_steps: int):
    """LambdaLR factor: linear warm-up to 1, then half a cosine from 1 down to 0 at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


SCHEDULES = ("poly", "cosine")


def lr_factor(schedule: str, warmup_steps: int, max_steps: int, poly_power: float):
    """The LambdaLR factor of a recipe's `lr_schedule`."""
    if schedule == "cosine":
        return cosine_schedule(warmup_steps, max_steps)
    return poly_schedule(warmup_steps, max_steps, poly_power)


__all__ = ["SCHEDULES", "cosine_schedule", "lr_factor", "poly_schedule"]
