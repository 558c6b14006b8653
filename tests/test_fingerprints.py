"""What a step's fingerprint records about its outside inputs: a user's dataset as it was when the step
started, the demo dataset (which notebook 01 builds itself on a fresh clone) as the step left it."""
from __future__ import annotations

from dfd_lib.pipeline import fingerprints
from dfd_lib.pipeline.steps import discover_steps


def _features_step():
    return next(step for step in discover_steps() if step.name == "01_features_umap")


def test_a_demo_built_by_the_step_is_signed_as_the_step_left_it(tmp_path, monkeypatch):
    demo = tmp_path / "data" / "demo"
    monkeypatch.setattr(fingerprints, "demo_dir_for", lambda n_images: demo)
    step, values = _features_step(), {"dataset": "demo", "test_dataset": ""}
    before = fingerprints.take(step, tmp_path / "run", values)
    assert before["external"] == {"dataset": fingerprints.MISSING}  # a fresh clone: no demo yet
    demo.mkdir(parents=True)
    (demo / "manifest.csv").write_text("path,label\n")  # what the step builds
    recorded = fingerprints.settled(before, step, values)
    assert recorded["external"] == {"dataset": fingerprints.tree_signature(demo)} != before["external"]
    assert {k: v for k, v in recorded.items() if k != "external"} == {k: v for k, v in before.items() if k != "external"}


def test_a_users_dataset_is_signed_as_it_was_when_the_step_started(tmp_path):
    folder = tmp_path / "photos"
    (folder / "real").mkdir(parents=True)
    (folder / "real" / "a.png").write_bytes(b"first")
    step, values = _features_step(), {"dataset": str(folder), "test_dataset": "demo-smoke"}
    before = fingerprints.take(step, tmp_path / "run", values)
    (folder / "real" / "b.png").write_bytes(b"added while the step ran")
    recorded = fingerprints.settled(before, step, values)
    assert recorded["external"]["dataset"] == before["external"]["dataset"] != fingerprints.tree_signature(folder)
    assert set(fingerprints.built_inputs(step, values)) == {"test_dataset"}
