"""Render the sbatch templates shipped in ``pipeline/rounds/templates/`` for one round of a run."""
from __future__ import annotations

import shlex
import string
from pathlib import Path

from pipeline.preempt import PREEMPTED_EXIT
from storage import write_text

TEMPLATES = Path(__file__).resolve().parent / "templates"
NAMES = ("prepare.sbatch", "cache_array.sbatch", "train.sbatch", "submit.sh")


def render(config: str, round_index: int, num_tasks: int, out_dir: str | Path, run_dir: str, gpus: int = 8,
           time_limit: str = "24:00:00", workdir: str | None = None, distillery: str = "distillery",
           templates: Path = TEMPLATES) -> list[Path]:
    """Write the four scripts for ``round_index`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    values = {
        "ROUND": str(round_index), "NUM_TASKS": str(num_tasks), "LAST_TASK": str(num_tasks - 1),
        "CONFIG": str(Path(config).resolve()), "RUN_DIR": str(Path(run_dir).resolve()), "GPUS": str(gpus),
        "TIME": time_limit, "LOG_DIR": str(out_dir.resolve()), "OUT_DIR": str(out_dir.resolve()),
        "WORKDIR": str(Path(workdir or Path.cwd()).resolve()), "DISTILLERY": shlex.quote(distillery),
        "PREEMPTED_EXIT": str(PREEMPTED_EXIT),
    }
    paths = []
    for name in NAMES:
        text = string.Template((templates / name).read_text()).safe_substitute(values)
        write_text(out_dir / name, text)
        (out_dir / name).chmod(0o755)
        paths.append(out_dir / name)
    return paths
