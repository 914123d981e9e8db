"""One report format for every benchmark: the command, the machine and library versions, then the results.

``write_results(folder, lines, data)`` writes ``results.md`` (a header with the exact command and the
environment, then ``lines``) and ``results.json`` (the same header fields plus ``data``) into ``folder``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["command", "environment", "environment_line", "median_range", "strip_plot", "write_results"]


def command() -> str:
    """How this process was started, as a user would type it (``python -m benchmarks.<name>.run ...``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    target = f"-m {spec.name}" if spec is not None and spec.name else sys.argv[0]
    return " ".join(["python", target, *sys.argv[1:]])


def environment() -> dict[str, Any]:
    """Platform, threads and the versions that move the numbers (torch, transformers, accelerate, numpy, GPU)."""
    import accelerate
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "gpu": gpu,
    }


def environment_line(env: dict[str, Any] | None = None) -> str:
    env = env or environment()
    return (
        f"{env['platform']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}, "
        f"accelerate {env['accelerate']}, numpy {env['numpy']}, GPU {env['gpu'] or 'none'}"
    )


def median_range(values: list[float], fmt: str = "{:.3f}") -> str:
    """``median [min, max]`` of the values (how every benchmark reports spread over seeds); one value as is."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 1:
        return fmt.format(v[0])
    return f"{fmt.format(np.median(v))} [{fmt.format(v.min())}, {fmt.format(v.max())}]"


def write_results(folder: str | os.PathLike[str], lines: list[str], data: dict[str, Any], stem: str = "results") -> str:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``folder``; returns the markdown text."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env, cmd = environment(), command()
    text = "\n".join([f"Command: `{cmd}`", "", f"Environment: {environment_line(env)}.", "", *lines]) + "\n"
    (folder / f"{stem}.md").write_text(text)
    (folder / f"{stem}.json").write_text(json.dumps({"command": cmd, "environment": env, **data}, indent=1))
    return text


def strip_plot(ax: Any, values: dict[str, list[float]], title: str, highlight: Any = lambda name: False) -> None:
    """One column per arm: a point per seed and a bar at the median (blue for ``highlight(arm)``, else gray)."""
    import statistics

    for x, (arm, points) in enumerate(values.items()):
        ax.scatter([x] * len(points), points, s=18, color="tab:blue" if highlight(arm) else "tab:gray")
        ax.hlines(statistics.median(points), x - 0.3, x + 0.3, color="black")
    ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right")
    ax.set_title(f"{title} (lower is better)")
