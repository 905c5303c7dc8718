"""EleutherAI lm-evaluation-harness tasks on an already-loaded model (optional: `surgery[lm-eval]`).

The model object is wrapped in lm-eval's HFLM as it is, so every model kind surgery loads is
scored by the harness without being saved or reloaded. A task is a harness task name or a task
YAML file (its folder is added to the harness's task search path), so tasks defined on local
data run offline.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from surgery.errors import SurgeryError


def resolve_tasks(specs: list[str]) -> tuple[list[str], list[str]]:
    """Task names, and the folders holding task YAML files given by path."""
    names, folders = [], []
    for spec in specs:
        if spec.endswith((".yaml", ".yml")):
            path = Path(spec)
            if not path.is_file():
                raise SurgeryError(f"--tasks: task file {spec} does not exist")
            config = yaml.safe_load(path.read_text()) or {}
            if not isinstance(config, dict) or not isinstance(config.get("task"), str):
                raise SurgeryError(f"--tasks: {spec} is not an lm-eval task file (it needs a 'task:' name)")
            names.append(config["task"])
            folders.append(str(path.resolve().parent))
        else:
            names.append(spec)
    return names, folders


def check_tasks(specs: list[str]) -> tuple[list[str], Any]:
    """Fail before any scoring: lm-eval installed, task files readable, every task known to it."""
    try:
        import accelerate  # noqa: F401  (lm-eval's HFLM needs it)
        import lm_eval  # noqa: F401
    except ImportError:
        raise SurgeryError("--tasks needs lm-evaluation-harness: pip install 'surgery[lm-eval]'") from None
    names, folders = resolve_tasks(specs)
    manager = _task_manager(tuple(folders))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise SurgeryError(f"--tasks: lm-eval knows no task {unknown[0]!r} (give a task name or a task .yaml file)")
    return names, manager


@cache
def _task_manager(folders: tuple[str, ...]) -> Any:
    """Indexing lm-eval's thousands of task files takes seconds: do it once per search path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None)


def run_tasks(model: Any, tokenizer: Any, specs: list[str], batch_size: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's `simple_evaluate` on this model object."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names, manager = check_tasks(specs)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, log_samples=False)
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and "stderr" not in key and key not in ("sample_len",)
        }
    return scores
