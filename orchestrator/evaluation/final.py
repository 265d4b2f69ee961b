"""The end-of-run evaluation: k-NN of every teacher, the distilled student and the same student at its
random initialisation (a Ray task runs ``final_knn``), and the table of ``knn.md``.
"""
from __future__ import annotations

import time
from typing import Any

from simreg.orchestrator.data.imageset import ImageSet


def final_knn(
    cfg_dict: dict[str, Any], teacher_dicts: list[dict[str, Any]], teacher_dims: dict[str, int],
    student_state: dict[str, Any], heads_state: dict[str, Any], bank: ImageSet, query: ImageSet,
) -> dict[str, Any]:
    """k-NN of every teacher, the distilled student and the same student at random init (runs remotely)."""
    import torch

    from simreg.models import build_backbone
    from simreg.orchestrator.config import validate_config
    from simreg.orchestrator.evaluation.knn import KNN_KS, knn_report
    from simreg.orchestrator.pipeline.teacher import TeacherSpec
    from simreg.orchestrator.train.builders import student_transform

    cfg = validate_config(cfg_dict, "eval config")
    torch.set_num_threads(cfg.eval.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf = student_transform(cfg)

    k = max(KNN_KS)
    fix = f"set data.knn_bank_size (now {cfg.data.knn_bank_size}) to {k} or more, over data with at least {k} train images"

    def run(encode: Any) -> dict[str, float]:
        return knn_report(
            encode, bank.images, bank.labels, query.images, query.labels, cfg.data.view_size, cfg.eval.batch_size, device,
            cfg.eval.knn_weighting, cfg.eval.knn_temperature, fix,
        )

    out: dict[str, Any] = {"teacher_knn": {}}
    t0 = time.perf_counter()
    for td in teacher_dicts:
        spec = TeacherSpec(**{**td, "mean": tuple(td["mean"]), "std": tuple(td["std"])})
        teacher = spec.build().to(device)
        out["teacher_knn"][spec.name] = run(teacher)
        del teacher
    torch.manual_seed(cfg.seed)  # the very initialisation the student started from
    random_student = build_backbone(cfg.student.arch, model_kwargs=cfg.student.model_kwargs).to(device).eval()
    out["random_student_knn"] = run(lambda v: random_student(tf(v)))
    student = build_backbone(cfg.student.arch, model_kwargs=cfg.student.model_kwargs)
    student.load_state_dict(student_state, strict=True)
    student = student.to(device).eval()
    out["student_knn"] = run(lambda v: student(tf(v)))
    if cfg.eval.head_layers:  # the student's feature after the first k layers of each head (paper, Table 2)
        from simreg.orchestrator.train.builders import build_objective

        objective = build_objective(cfg, teacher_dims)
        objective.backbone.load_state_dict(student_state, strict=True)
        objective.heads.load_state_dict(heads_state, strict=True)
        objective = objective.to(device).eval()
        out["student_head_knn"] = {
            f"{name}/{k}": run(lambda v, name=name, k=k: objective.head_features(v, name, k))
            for name in teacher_dims for k in cfg.eval.head_layers
        }
    out["eval_s"] = time.perf_counter() - t0
    return out


def knn_table(summary: dict[str, Any]) -> str:
    rows = [("model", "1-NN top-1", "20-NN top-1")]
    for name, r in summary["teacher_knn"].items():
        rows.append((f"teacher {name}", f"{r['top1_1nn']:.2f}", f"{r['top1_20nn']:.2f}"))
    s, r0 = summary["student_knn"], summary["random_student_knn"]
    rows.append((f"student {summary['student_arch']} (SimReg)", f"{s['top1_1nn']:.2f}", f"{s['top1_20nn']:.2f}"))
    for where, r in summary.get("student_head_knn", {}).items():
        name, k = where.split("/")
        rows.append((f"student after {k} layer(s) of head {name}", f"{r['top1_1nn']:.2f}", f"{r['top1_20nn']:.2f}"))
    rows.append((f"student {summary['student_arch']} (random init)", f"{r0['top1_1nn']:.2f}", f"{r0['top1_20nn']:.2f}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, rows[1:])])
