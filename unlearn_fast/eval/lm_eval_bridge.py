"""lm-evaluation-harness on an in-memory model (``unlearn-fast eval --lm-eval-tasks``).

The harness scores each task through its Hugging Face wrapper (``HFLM``) around the model
and tokenizer already loaded (a Hugging Face tokenizer: HFLM tokenises with it). Task data
must be local: a task of the harness whose dataset is in the local ``datasets`` cache, or a
task YAML of one's own (``include_path``: a directory of task YAMLs, e.g. a ``dataset_path:
json`` task over a local file). Nothing is downloaded: the Hugging Face libraries are put in
offline mode for the run (``hugging_face_offline``).
"""
from __future__ import annotations

import os

from ..data.benchmarks import hugging_face_offline


def lm_eval_bridge(model, tokenizer, tasks: list[str], *, include_path=None, batch_size: int = 8,
                   limit: int | None = None, log_samples: bool = False, add_bos_token: bool | None = None,
                   include_defaults: bool = True) -> dict:
    """Run lm-evaluation-harness ``tasks`` on ``model``; returns the harness's ``results`` per task,
    or with ``log_samples`` the whole output (``results`` and the per-item ``samples``).

    ``include_defaults=False`` skips indexing the harness's own task library (~14 s on a slow
    CPU) when every task comes from ``include_path``.
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'lm-eval>=0.4,<0.5' "
                          "(and the task data in the local Hugging Face datasets cache)") from exc
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"include_path {include_path} is not a directory of task YAML files")
    if include_path is None and not include_defaults:
        raise ValueError("include_defaults=False needs an include_path with the task YAML files")
    kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    with hugging_face_offline():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        manager = TaskManager(include_path=None if include_path is None else str(include_path),
                              include_defaults=include_defaults)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=log_samples)
    if out is None:
        raise RuntimeError("lm_eval.simple_evaluate returned nothing (not the main process?)")
    return out if log_samples else out.get("results", {})
