"""Fine-tuning the fastmlm encoder: task heads, the two bundled tasks, metrics, baselines, the loop.

    heads.py      SequenceClassifier (pooler, dropout, linear), TokenClassifier; their folders
    tasks.py      docs-section / code-entities / JSONL files: reading, checking, tokenising
    metrics.py    accuracy, macro-F1, entity-level precision / recall / F1
    baselines.py  majority class and a bag-of-words logistic regression
    config.py     FinetuneConfig
    loop.py       finetune(): epochs, warm-up and decay, evaluation, early stopping, checkpoints, resume
    export.py     export-hf for fine-tuned runs (transformers Bert*Classification folders)
    cli.py        ``fastmlm finetune``
"""
from .config import FinetuneConfig
from .export import export_finetuned
from .heads import SequenceClassifier, TokenClassifier, load_task_model
from .loop import finetune
from .tasks import Task, TaskFileError, load_task

__all__ = ["FinetuneConfig", "SequenceClassifier", "Task", "TaskFileError", "TokenClassifier", "export_finetuned",
           "finetune", "load_task", "load_task_model"]
