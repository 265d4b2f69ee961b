from __future__ import annotations

import pytest

from simreg.models import ConfigError
from simreg.orchestrator.config import load_config
from simreg.orchestrator.evaluation.final import knn_table
from simreg.orchestrator.train.builders import build_objective, build_optimizer, shard_plan
from simreg.orchestrator.train.placement import Placement, concurrent_trials, resource_check

CPU_ONLY = Placement(has_gpu=False, use_gpu=False, teacher_gpus=0.0)


def test_shard_plan_equal_split_and_last_batch():
    assert shard_plan(10000, 128, 2) == (5000, 64, 79)  # 78 full batches + one of 8
    assert shard_plan(301, 64, 2) == (150, 32, 5)  # one row dropped by the equal split
    assert shard_plan(130, 64, 2) == (65, 32, 2)  # a last batch of 1 row is skipped (BatchNorm)


def test_resource_rule_refuses_a_plan_that_would_hang():
    cfg = load_config(None, ["scaling.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match=r"needs 3 CPUs .*teacher_pool.view_tasks=2 .* cluster has 2: lower those keys"):
        resource_check(cfg, {"CPU": 2.0}, CPU_ONLY)
    resource_check(load_config(), {"CPU": 2.0}, CPU_ONLY)  # the demo fits 2 CPUs
    with pytest.raises(ConfigError, match=r"needs 3 GPU\(s\) .* cluster has 2"):
        resource_check(load_config(), {"CPU": 8.0, "GPU": 2.0}, Placement(True, True, 1.0))
    resource_check(load_config(), {"CPU": 8.0, "GPU": 3.0}, Placement(True, True, 1.0))  # 2 students + 1 teacher



def test_a_run_whose_every_target_is_cached_needs_room_for_its_students_only():
    """It starts no teacher actor and no view task (train/cached_data.py): neither the teacher's GPU, nor its
    custom resources, nor the pipeline's CPUs are asked of the cluster."""
    gpu = Placement(True, True, 1.0)
    with pytest.raises(ConfigError, match=r"needs 3 GPU\(s\) \(students \+ teacher actors\)"):
        resource_check(load_config(), {"CPU": 8.0, "GPU": 2.0}, gpu)
    resource_check(load_config(), {"CPU": 8.0, "GPU": 2.0}, gpu, cached=True)  # the 2 students' GPUs
    with pytest.raises(ConfigError, match=r"needs 2 GPU\(s\) \(students\) but the cluster has 1: set scaling.use_gpu=false or fewer workers$"):
        resource_check(load_config(), {"CPU": 8.0, "GPU": 1.0}, gpu, cached=True)
    on_teacher_node = load_config(None, ["teacher_pool.resources={teacher_gpu: 1}"])
    with pytest.raises(ConfigError, match="teacher_pool.resources.teacher_gpu"):
        resource_check(on_teacher_node, {"CPU": 2.0}, CPU_ONLY)
    resource_check(on_teacher_node, {"CPU": 2.0}, CPU_ONLY, cached=True)
    big = load_config(None, ["scaling.cpus_per_worker=1", "teacher_pool.cpus_per_actor=1"])
    with pytest.raises(ConfigError, match=r"needs 3.5 CPUs"):
        resource_check(big, {"CPU": 2.0}, CPU_ONLY)
    resource_check(big, {"CPU": 2.0}, CPU_ONLY, cached=True)  # 2 workers x 1 CPU
    with pytest.raises(ConfigError, match=r"needs 2 CPUs \(scaling.num_workers=2 x scaling.cpus_per_worker=1\) but the Ray cluster has 1"):
        resource_check(big, {"CPU": 1.0}, CPU_ONLY, cached=True)

def test_a_fleet_sweep_fits_more_trials_than_one_with_teachers_per_trial():
    cfg = load_config(None, ["scaling.num_workers=1", "scaling.cpus_per_worker=1", "teacher_pool.cpus_per_actor=1",
                             "teacher_pool.view_tasks=1", "teacher_pool.cpus_per_view_task=0.5"])
    # 10 CPUs: with the fleet (1 CPU once) 9 / 1.51 -> 5 trials; a teacher per trial: 10 / 2.51 -> 3
    assert concurrent_trials(cfg, {"CPU": 10.0}, CPU_ONLY, fleet=True) == (5, pytest.approx(1.51))
    assert concurrent_trials(cfg, {"CPU": 10.0}, CPU_ONLY, fleet=False) == (3, pytest.approx(2.51))
    # GPUs: 8, one per student and one per teacher actor: the fleet takes 1, then 7 trials; per trial 8 / 2 = 4
    gpu = Placement(True, True, 1.0)
    assert concurrent_trials(cfg, {"CPU": 64.0, "GPU": 8.0}, gpu, fleet=True)[0] == 7
    assert concurrent_trials(cfg, {"CPU": 64.0, "GPU": 8.0}, gpu, fleet=False)[0] == 4
    assert concurrent_trials(cfg, {"CPU": 2.0}, CPU_ONLY, fleet=True)[0] == 1  # never 0: one trial beside the fleet
    # every target cached: no fleet, no view tasks: 10 / 1.01 -> 9 trials; on GPUs one per student
    assert concurrent_trials(cfg, {"CPU": 10.0}, CPU_ONLY, fleet=False, cached=True) == (9, pytest.approx(1.01))
    assert concurrent_trials(cfg, {"CPU": 64.0, "GPU": 8.0}, gpu, fleet=False, cached=True)[0] == 8


def test_cosine_schedule_reaches_zero():
    cfg = load_config(None, ["train.epochs=2", "optim.warmup_epochs=0.5"])
    obj = build_objective(cfg, {"t": 8})
    opt, sch = build_optimizer(cfg, obj, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs[0] == pytest.approx(cfg.optim.lr / 5)  # warm-up over 5 steps
    assert max(lrs) == pytest.approx(cfg.optim.lr)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_knn_table():
    s = {
        "teacher_knn": {"t": {"top1_1nn": 80.0, "top1_20nn": 81.5}},
        "student_knn": {"top1_1nn": 70.0, "top1_20nn": 72.25},
        "random_student_knn": {"top1_1nn": 60.0, "top1_20nn": 61.0},
        "student_arch": "resnet10t",
    }
    t = knn_table(s)
    assert "| teacher t " in t and "81.50" in t and "72.25" in t and "(random init)" in t
