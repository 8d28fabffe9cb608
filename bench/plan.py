"""What one benchmark run measures: the settings (model preset, image size, batch) and the time budget of each suite."""

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Setting:
    """A model preset (see `models.MODEL_PRESETS`) at an image size and batch size."""

    preset: str
    image_size: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.preset} {self.image_size}² b{self.batch}"


@dataclass
class BenchPlan:
    """What one run measures and how long it may spend on each comparison (seconds of timed rounds)."""

    grid: list[Setting]
    train_grid: list[Setting]
    headline: Setting
    num_experts_sweep: tuple[int, ...] = (4, 8, 16)
    loop_settings: list[Setting] = field(default_factory=list)
    sweep: Setting = Setting("vit-s", 256, 1)
    sweep_experts: tuple[int, ...] = (2, 4, 8, 16)
    sweep_tasks: tuple[int, ...] = (1, 3, 5)
    sweep_mmoe_layers: tuple[tuple[int, ...], ...] = ((12,), (6, 12), (3, 6, 9, 12))
    sweep_image_sizes: tuple[int, ...] = (128, 256, 512)
    subset_task: str = "semseg"
    pipeline_settings: list[Setting] = field(default_factory=list)
    memory_setting: Setting = Setting("tiny", 128, 1)
    modsquad_image_size: int = 128
    # ONNX Runtime against eager PyTorch: the headline setting and the tiny one (empty: the headline only).
    onnx_settings: list[Setting] = field(default_factory=lambda: [Setting("vit-b", 512, 1), Setting("tiny", 128, 1)])
    modsquad_batch: int = 1
    modsquad_tasks: tuple[str, ...] = ("semseg", "depth")
    memory_model_calls: int = 1000
    memory_pipeline_calls: int = 200
    data_samples: int = 200
    data_image_size: int = 128
    data_batch: int = 8
    data_workers: tuple[int, ...] = (0, 2)
    forward_budget_s: float = 6.0
    train_budget_s: float = 6.0
    small_budget_s: float = 2.0
    min_rounds: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def default_plan() -> BenchPlan:
    """`make bench` on a 2-core CPU: under 10 minutes. Training steps of the larger settings are left to `--full`
    (minutes each on such a machine)."""
    grid = [Setting(p, s, 1) for p in ("tiny", "vit-s", "vit-b") for s in (256, 512)]
    return BenchPlan(
        grid=grid,
        train_grid=[Setting("tiny", 256, 1), Setting("vit-s", 256, 1)],
        headline=Setting("vit-b", 512, 1),
        loop_settings=[Setting("vit-b", 512, 1), Setting("tiny", 128, 8)],
        pipeline_settings=[Setting("tiny", 128, 1), Setting("vit-s", 256, 1)],
    )


def full_plan() -> BenchPlan:
    """The default plan plus training steps of every grid setting (about an hour on a 2-core CPU)."""
    plan = default_plan()
    plan.train_grid = list(plan.grid)
    return plan


def quick_plan() -> BenchPlan:
    """Tiny sizes that exercise every suite in seconds (the smoke test; the numbers mean nothing)."""
    tiny = Setting("tiny", 32, 2)
    return BenchPlan(
        grid=[tiny],
        train_grid=[tiny],
        headline=tiny,
        num_experts_sweep=(2, 4),
        loop_settings=[tiny],
        sweep=Setting("tiny", 32, 1),
        sweep_experts=(2,),
        sweep_tasks=(1,),
        sweep_mmoe_layers=((4,),),
        sweep_image_sizes=(32,),
        pipeline_settings=[Setting("tiny", 32, 1)],
        memory_setting=Setting("tiny", 32, 1),
        modsquad_image_size=32,
        onnx_settings=[],
        memory_model_calls=20,
        memory_pipeline_calls=5,
        data_samples=4,
        data_image_size=32,
        data_batch=2,
        forward_budget_s=0.0,
        train_budget_s=0.0,
        small_budget_s=0.0,
        min_rounds=2,
    )


@dataclass
class SuiteContext:
    """What a suite's `measure` gets: the plan, the sections measured before it (by key) and the command line."""

    plan: BenchPlan
    sections: dict
    args: object = None
