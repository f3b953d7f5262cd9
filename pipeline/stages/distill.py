"""Distillation stage (`make distill`): saved_models/<run>/distilled/, a smaller student trained on the trained
model's soft labels. `make compress` makes the same student on a backbone run, so both stages call
pipeline/export/student.py; the training itself is in pipeline/model/distillation.py."""
from pipeline.export.student import make_student


def run_distill_stage(cfg, run):
    """`python -m pipeline distill`: saved_models/<run>/distilled/, a model directory like the teacher's,
    with metrics.json comparing student and teacher (accuracy, macro F1, parameters, FLOPs)."""
    return make_student(cfg, run)
