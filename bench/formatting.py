"""Formatting helpers of the benchmark suites: numbers and settings as table cells, Markdown tables, and matplotlib
plots written atomically. Every suite and the report import them from here (the report imports the suites, so the
helpers cannot live in the report)."""

from pathlib import Path
from typing import Optional

from modeling_taskexpert.file_utils import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    return plt


def save_plot(figure, path: Path) -> Path:
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    pyplot().close(figure)
    return Path(path)


def ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def mib(size: Optional[float]) -> str:
    return "—" if size is None else f"{size / 2**20:.0f}"


def millions(count: float) -> str:
    return f"{count / 1e6:.1f}M"


def gflops(count: float) -> str:
    return f"{count / 1e9:.1f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def setting_label(setting: dict) -> str:
    return f"{setting['preset']} {setting['image_size']}² b{setting['batch']}"
