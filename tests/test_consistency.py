"""Settings of different steps that must agree are checked before anything runs (dfd check), and a
backbone is never silently dropped (an error at training time when K turned out too small)."""
from __future__ import annotations

import pytest

from dfd_lib.cli import main as dfd
from dfd_lib.pipeline.consistency import cross_step_checks, expert_count
from dfd_lib.pipeline.profiles import step_values
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.training_data import expert_configs


def _values(clusters: dict, train: dict) -> dict:
    return {"02_cluster_split": clusters, "04_train_moe": train}


def test_more_backbones_than_experts_can_ever_train_is_a_problem():
    problems, _ = cross_step_checks(_values({"n_clusters": 0, "k_min": 2, "k_max": 4}, {"backbones": list("abcde")}))
    assert problems == ["04.backbones lists 5 backbones but at most 4 experts train (K chosen between 02.k_min=2 and 02.k_max=4, "
                        "possibly fewer after merging single-class clusters (02.merge_single_class)): e would never train; "
                        "give at most 4 backbones or more clusters"]
    capped = cross_step_checks(_values({"n_clusters": 7, "merge_single_class": False}, {"backbones": list("abc"), "max_experts": 2}))[0]
    assert capped and "at most 2 experts train (02.n_clusters=7, at most 04.max_experts=2)" in capped[0]


def test_what_depends_on_the_data_is_a_note():
    problems, notes = cross_step_checks(_values({"n_clusters": 7}, {"backbones": list("abcdefg")}))  # the full profile
    assert not problems and "04.backbones: 7 backbones need 7 re-splits" in notes[0]
    assert cross_step_checks(_values({"n_clusters": 7, "merge_single_class": False}, {"backbones": list("abcdefg")})) == ([], [])
    assert expert_count({"n_clusters": 9, "merge_single_class": False}, {"max_experts": 7}).low == 7


def test_weights_and_the_ablation_resplit_must_name_something():
    problems, _ = cross_step_checks(_values({"n_clusters": 3, "merge_single_class": False},
                                            {"backbones": ["a", "b"], "backbone_weights": ["w1", "w2", "w3"], "ablation_resplit": 3}))
    assert any("04.backbone_weights lists 3 files for 2 backbones" in p for p in problems)
    assert any("04.ablation_resplit=3 names no expert: at most 3 experts train" in p for p in problems)
    tuned, _ = cross_step_checks(_values({"n_clusters": 3, "merge_single_class": False},
                                            {"backbones": ["a", "b"], "tunings": ["full", "lora", "frozen"]}))
    assert any("04.tunings lists 3 tunings for 2 backbones" in p for p in tuned)
    fine = cross_step_checks(_values({"n_clusters": 3, "merge_single_class": False},
                                     {"backbones": ["a"], "backbone_weights": "w", "ablation_resplit": 3, "run_ablation": False,
                                      "ladder_seeds": 0}))
    assert fine == ([], [])  # no ablation and no ladder: the re-split is never used


def test_every_profile_agrees_with_itself():
    for profile in ("smoke", "demo", "full", "full-mini"):
        assert cross_step_checks(step_values(profile))[0] == [], profile


def test_dfd_check_stops_on_a_backbone_that_would_never_train(capsys):
    five = "04.backbones=[" + ", ".join(["tf_efficientnet_lite0"] * 4 + ["no_such_net"]) + "]"
    assert dfd(["check", "--profile", "smoke", "--only", "02,04", "-p", five]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: 04.backbones lists 5 backbones but at most 4 experts train" in out and "no_such_net would never train" in out
    assert "PROBLEM: 04_train_moe backbone no_such_net: unknown backbone" in out  # named, not a crash of the memory estimate


def test_expert_configs_cycle_fewer_backbones_and_refuse_more():
    configs = expert_configs(TrainConfig(), ["a", "b"], [], 5)
    assert [c.backbone for c in configs] == ["a", "b", "a", "b", "a"]
    with pytest.raises(ValueError, match="3 backbones for 2 experts .*: c would never train"):
        expert_configs(TrainConfig(), ["a", "b", "c"], [], 2)
    with pytest.raises(ValueError, match="2 backbone_weights for 3 backbones"):
        expert_configs(TrainConfig(), ["a", "b", "c"], ["x", "y"], 3)
