"""Learning-rate schedules of the training recipes, as `torch.optim.lr_scheduler.LambdaLR` factors."""


def poly_schedule(warmup_steps: int, max_steps: int, power: float):
    """LambdaLR factor: linear warm-up to 1, then (1 - t / T)^power down to 0 (the protocol's poly schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - step / max_steps) ** power

    return factor


__all__ = ["poly_schedule"]
