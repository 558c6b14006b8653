"""enrich_dataset (notebook 03): provenance rows that inherit group/split/cluster, resume, failures logged; attaching
the augmented rows to the re-splits keeps each on its source's side."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data

from dfd_lib.data import resplit_table
from dfd_lib.data.manifest import COLUMNS, Manifest, file_sha1
from dfd_lib.data.resplit_table import attach_to_resplits
from dfd_lib.embed import clusters
from dfd_lib.embed import resplits as resplit_lib
from dfd_lib.synth.config import EnrichmentConfig
from dfd_lib.synth.enrichment import enrich_dataset, save_augmented_manifest
from dfd_lib.synth.factory import BUILTIN_FAMILIES
from dfd_lib.synth.summary import family_counts, plot_enrichment_grid, resplit_side_counts

ALL_SPLITS = ()  # source_splits that draws from every split (the config's default is train and val only)


@pytest.fixture()
def source_table(tmp_path) -> pd.DataFrame:
    """Six readable sources (five reals, one fake) and one unreadable real, on three splits."""
    folder = tmp_path / "source"
    folder.mkdir()
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    rows = []
    for i in range(6):
        path = folder / f"img{i}.png"
        Image.fromarray(photos[i % 3]).resize((80 + 8 * i, 72)).save(path)
        rows.append(dict(path=str(path), label=int(i == 5), family="real" if i < 5 else "splice",
                         source=f"src{i % 3}", group=f"g{i}", width=80 + 8 * i, height=72, hash=file_sha1(path),
                         split=("train", "val", "test")[i % 3], cluster=i % 2))
    broken = folder / "broken.png"
    broken.write_bytes(b"not an image at all")
    rows.append(dict(path=str(broken), label=0, family="real", source="src9", group="g9", width=80, height=72,
                     hash="x", split="train", cluster=0))
    return pd.DataFrame(rows)


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: file_sha1(p) for p in sorted(folder.iterdir())}


def test_rows_inherit_provenance_and_rerun_resumes(source_table, tmp_path, caplog):
    before = _snapshot(tmp_path / "source")
    # the broken source is bad input on purpose: its images are listed and skipped, within any budget
    config = EnrichmentConfig(images_per_family=3, degrade_fake_fraction=0.34, sd_batch_size=2, seed=1, source_splits=ALL_SPLITS,
                              max_failed_share=1.0)
    out = tmp_path / "augmented"
    rows, failures = enrich_dataset(source_table, config, out, progress=False)

    assert _snapshot(tmp_path / "source") == before  # sources only read
    assert list(rows.columns) == COLUMNS + ["parent", "seed", "params", "mask"]
    by_path = source_table.set_index("path")
    broken = str(tmp_path / "source" / "broken.png")
    # with seed 1 the broken file is drawn as a source and as a splice donor: each is one failure
    assert len(failures) and len(rows) + len(failures) == 3 * len(BUILTIN_FAMILIES)
    assert ((failures["parent"] == broken) | failures["reason"].str.contains("donor .*broken.png")).all()
    assert failures["reason"].str.contains("not an image").all()
    assert caplog.text.count("failed: ") == len(failures)
    for row in rows.itertuples():
        parent = by_path.loc[row.parent]
        assert (row.group, row.split, row.cluster, row.source) == (parent.group, parent.split, parent.cluster, parent.source)
        assert Path(row.path).is_file() and Path(row.path).parent == out / row.family
        assert file_sha1(row.path) == row.hash
        with Image.open(row.path) as image:
            assert image.size == (row.width, row.height) == (parent.width, parent.height)
        assert isinstance(json.loads(row.params), dict)
        expected_label = 0 if row.family == "degraded" else 1
        assert row.label == expected_label
        assert parent.label == (1 if row.family == "degraded_fake" else 0)
        # every fake records its mask beside it (tests/test_factory_masks.py checks what it holds); the
        # degradations of reals, and of a fake that brings no mask, have none
        assert pd.isna(row.mask) if row.family.startswith("degraded") else Path(row.mask).is_file()
    assert set(rows["family"]) == set(BUILTIN_FAMILIES) | {"degraded_fake"}

    # the rerun writes nothing new and returns the same rows
    stamps = {p: Path(p).stat().st_mtime_ns for p in rows["path"]}
    again, failures_again = enrich_dataset(source_table, config, out, progress=False)
    pd.testing.assert_frame_equal(rows, again)
    assert {p: Path(p).stat().st_mtime_ns for p in again["path"]} == stamps
    assert len(failures_again) == len(failures)

    # an interrupted image (no sidecar yet) is made again, identically
    victim = Path(rows["path"].iloc[0])
    victim.with_suffix(".json").unlink()
    third, _ = enrich_dataset(source_table, config, out, progress=False)
    pd.testing.assert_frame_equal(rows, third)


def test_unreadable_source_is_reported_and_skipped(source_table, tmp_path, caplog):
    only_broken_and_one = source_table.iloc[[0, 6]].reset_index(drop=True)
    config = EnrichmentConfig(families=("colour_background", "sd_img2img", "degraded"), images_per_family=2, max_failed_share=1.0)
    rows, failures = enrich_dataset(only_broken_and_one, config, tmp_path / "out", progress=False)
    broken = str(tmp_path / "source" / "broken.png")
    assert len(rows) == 6 - len(failures) and len(failures) >= 1
    assert set(failures["parent"]) == {broken}
    assert failures["reason"].str.contains("not an image").all()
    assert caplog.text.count("broken.png") == len(failures)  # one line per failed image
    assert set(rows["parent"]) == {source_table.loc[0, "path"]}


def test_same_config_gives_same_images_and_new_seed_new_ones(source_table, tmp_path):
    table = source_table.iloc[:5]
    config = EnrichmentConfig(families=("splice", "self_blend", "sd_inpaint"), images_per_family=2, seed=3,
                              source_splits=ALL_SPLITS)
    first, _ = enrich_dataset(table, config, tmp_path / "a", progress=False)
    second, _ = enrich_dataset(table, config, tmp_path / "b", progress=False)
    assert list(first["hash"]) == list(second["hash"])
    other, _ = enrich_dataset(table, EnrichmentConfig(families=config.families, images_per_family=2, seed=4,
                                                      source_splits=ALL_SPLITS),
                               tmp_path / "a", progress=False)
    assert not set(other["hash"]) & set(first["hash"])
    # splice donors come from the target's own split
    for row in first[first["family"] == "splice"].itertuples():
        donor = json.loads(row.params)["donor"]
        assert table.set_index("path").loc[donor, "split"] == row.split


def test_bad_configs_fail_before_writing(tmp_path, source_table):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        EnrichmentConfig(sd_checkpoint=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="single-file config not found"):
        EnrichmentConfig(sd_single_file_config=str(tmp_path / "no-configs"))
    assert EnrichmentConfig(sd_checkpoint="", device="").checkpoint_for("img2img") is None  # '' = the tiny pipeline
    with pytest.raises(ValueError, match="unknown family \\['warp'\\]"):
        EnrichmentConfig(families=("warp",))
    with pytest.raises(ValueError, match="steps \\* strength"):
        EnrichmentConfig(steps=1, strength=0.5)
    with pytest.raises(ValueError, match="source_splits"):
        enrich_dataset(source_table.drop(columns="split"), EnrichmentConfig(source_splits=("train",)), tmp_path / "o")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- re-splits (what notebook 04 trains on)
@pytest.fixture()
def resplit_world(tmp_path):
    """A small dataset with re-splits built by dfd_lib.embed: 18 train/val groups (a real and
    its fake each) in three embedding blobs, plus 3 test-split reals that 02 never clusters."""
    folder = tmp_path / "data"
    folder.mkdir()
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    rng = np.random.default_rng(0)
    rows, embeddings = [], []
    for g in range(21):
        split_name = "test" if g >= 18 else ("train", "val")[g % 2]
        for label in (0, 1):
            path = folder / f"g{g}_{label}.png"
            array = photos[g % 3][8 * g:8 * g + 64, 4 * label:4 * label + 64]
            Image.fromarray(array).save(path)
            rows.append(dict(path=str(path), label=label, family="real" if label == 0 else "splice", source=f"s{g % 3}",
                             group=str(g), width=64, height=64, hash=file_sha1(path), split=split_name, cluster=None))
            embeddings.append(rng.normal(10.0 * (g % 3), 0.5, 8))
    table = pd.DataFrame(rows)
    trainval = (table["split"] != "test").to_numpy()
    ids = clusters.cluster_embeddings(np.array(embeddings)[trainval], k=3, seed=0)
    resplits = resplit_lib.leave_one_cluster_out(clusters.assign_groups_to_clusters(table[trainval].reset_index(drop=True), ids))
    path = resplit_table.save_resplits(resplits, tmp_path / "run" / "resplits.csv")
    return table, resplit_table.load_resplits(path)


def test_augmented_images_land_on_their_source_side_of_every_resplit(resplit_world, tmp_path, caplog):
    table, resplits = resplit_world
    columns = resplit_table.resplit_columns(resplits)
    assert len(columns) == 3 and set(resplits["resplit_0"]) == {"train", "val"}
    # draw from the whole table, test rows included, to prove attach drops what 02 never clustered
    config = EnrichmentConfig(families=("splice", "sd_inpaint", "degraded"), images_per_family=12, seed=2,
                              sd_batch_size=6, sd_image_size=64, source_splits=ALL_SPLITS)
    rows, failures = enrich_dataset(table, config, tmp_path / "run" / "augmented", progress=False)
    assert len(failures) == 0 and len(rows) == 36
    from_test = rows["split"].eq("test")
    assert from_test.any()  # the plan did pick test sources here ...
    caplog.clear()
    attached = attach_to_resplits(resplits, rows)
    assert attached.attrs["dropped"] == int(from_test.sum())  # ... and they are dropped, with a line saying so
    assert f"dropped {from_test.sum()} augmented" in caplog.text
    assert len(attached) == len(rows) - from_test.sum()

    source_side = resplits.set_index("path")
    for row in attached.itertuples():
        parent = source_side.loc[row.parent]
        assert row.cluster == parent["cluster"] and row.group == parent["group"]
        for column in columns:
            assert getattr(row, column) == parent[column]

    # notebook 04: expert i trains on resplit_i == "train" of the concatenation
    combined = pd.concat([resplits, attached], ignore_index=True)
    test_groups = set(table.loc[table["split"] == "test", "group"])
    for column in columns:
        train, val = combined[combined[column] == "train"], combined[combined[column] == "val"]
        assert not set(train["group"]) & set(val["group"])
        assert not set(train["group"]) & test_groups  # no test source feeds training
        augmented_train = train[train["path"].isin(attached["path"])]
        assert len(augmented_train) and (augmented_train["parent"].map(source_side[column]) == "train").all()
    resplit_table.check_no_group_leakage(combined)

    # the manifest 04 reads: relative paths, read back by Manifest.load
    path = save_augmented_manifest(attached, tmp_path / "run" / "augmented_manifest.csv")
    on_disk = pd.read_csv(path)
    assert not on_disk["path"].str.startswith("/").any()  # below the run folder: stored relative
    loaded = Manifest.load(path).table
    assert list(loaded["path"]) == list(attached["path"]) and list(loaded["resplit_1"]) == list(attached["resplit_1"])
    counts = resplit_side_counts(attached)
    assert list(counts.index) == columns and counts.to_numpy().sum() == 3 * len(attached)


def test_attach_refuses_a_resplit_table_that_leaks(resplit_world, tmp_path):
    table, resplits = resplit_world
    broken = resplits.copy()
    broken.loc[broken.index[0], "resplit_0"] = "val" if broken.loc[broken.index[0], "resplit_0"] == "train" else "train"
    rows = pd.DataFrame([{**table.iloc[0].to_dict(), "path": str(tmp_path / "x.png"), "hash": "h", "parent": table.iloc[0]["path"]}])
    with pytest.raises(resplit_table.LeakageError, match="several clusters or sides"):
        attach_to_resplits(broken, rows)
    with pytest.raises(ValueError, match="re-split table"):
        attach_to_resplits(resplits.drop(columns=resplit_table.resplit_columns(resplits)), rows)


def test_given_masks_are_used_and_a_wrong_size_one_fails_alone(source_table, tmp_path, caplog):
    table = source_table.iloc[[0, 1]].copy()
    good = Image.new("L", (80, 72), 0)
    good.paste(255, (20, 20, 60, 50))
    good.save(tmp_path / "good_mask.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small_mask.png")
    table["inpaint_mask"] = [str(tmp_path / "good_mask.png"), str(tmp_path / "small_mask.png")]
    picks = table.loc[[0, 0, 1, 1]].reset_index(drop=True)  # each source twice, so both are surely drawn
    config = EnrichmentConfig(families=("sd_inpaint",), images_per_family=4, sd_batch_size=4, sd_image_size=64,
                              source_splits=ALL_SPLITS, max_failed_share=1.0)
    rows, failures = enrich_dataset(picks, config, tmp_path / "out", progress=False)
    assert set(rows["parent"]) == {table["path"].iloc[0]} and len(rows) + len(failures) == 4
    assert set(failures["parent"]) == {table["path"].iloc[1]}
    assert failures["reason"].str.fullmatch(r"ValueError: mask .*small_mask.png is 32x32 but its source is 88x72").all()
    assert caplog.text.count("small_mask.png is 32x32") == len(failures)
    source = np.asarray(Image.open(table["path"].iloc[0]).convert("RGB"))
    for row in rows.itertuples():
        made = np.asarray(Image.open(row.path))
        outside = np.asarray(good) == 0
        assert np.array_equal(made[outside], source[outside]) and not np.array_equal(made, source)
        assert json.loads(row.params)["mask"].endswith("good_mask.png")


def test_enrichment_grid_and_family_counts(source_table, tmp_path):
    config = EnrichmentConfig(families=("colour_background", "degraded"), images_per_family=3, max_failed_share=1.0)
    rows, failures = enrich_dataset(source_table, config, tmp_path / "out", progress=False)
    counts = family_counts(rows, failures)
    assert counts.loc["colour_background", "label"] == "fake" and counts.loc["degraded", "label"] == "real"
    assert (counts["images"] + counts["failed"]).sum() == 6 and counts["failed"].sum() == len(failures)
    fig = plot_enrichment_grid(rows, tmp_path / "grid.png", per_family=2)
    assert (tmp_path / "grid.png").stat().st_size > 1000 and fig.axes[0].get_title() == "source"
    assert len(fig.axes) == len(counts[counts["images"] > 0]) * 6


def test_command_line_generates_into_the_run_and_stops_early_on_a_missing_checkpoint(resplit_world, tmp_path, capsys):
    from dfd_lib.cli import main as dfd_main

    run_dir = tmp_path / "run"
    assert dfd_main(["augment", "--run-dir", str(run_dir), "--families", "sd_img2img", "--sd-checkpoint", str(tmp_path / "nope")]) == 2
    assert "dfd augment: Stable Diffusion checkpoint not found" in capsys.readouterr().err
    assert not (run_dir / "augmented").exists()  # stopped before writing anything
    assert dfd_main(["augment", "--run-dir", str(run_dir), "--families", "resample", "--images-per-family", "3"]) == 0
    assert len(list((run_dir / "augmented" / "resample").glob("*.png"))) == 3


def test_the_command_takes_every_option_of_the_notebook():
    import argparse

    import papermill

    from dfd_lib.core.paths import NOTEBOOKS_DIR
    from dfd_lib.synth import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    options = {action.dest for action in parser._actions}
    declared = set(papermill.inspect_notebook(str(NOTEBOOKS_DIR / "03_sd_augment.ipynb")))
    display_only = {"grid_examples"}  # how many examples the notebook's figure shows
    assert declared - display_only <= options
    parsed = parser.parse_args(["--run-dir", "r", "--no-keep-unmasked", "--source-splits", "--families", "splice"])
    config = EnrichmentConfig.from_params(vars(parsed))
    assert config.keep_unmasked is False and config.source_splits == () and config.families == ("splice",)


def test_a_local_inpainting_checkpoint_serves_sd_inpaint(source_table, tmp_path):
    from dfd_lib.synth import diffusion

    folder = diffusion.save_pipeline(diffusion.build_tiny_pipeline("inpaint", seed=7), tmp_path / "my-inpainting")
    config = EnrichmentConfig(families=("sd_img2img", "sd_inpaint"), images_per_family=1, sd_inpaint_checkpoint=str(folder),
                              sd_image_size=64)
    assert config.checkpoint_for("inpaint") == str(folder) and config.checkpoint_for("img2img") is None
    rows, failures = enrich_dataset(source_table.iloc[:5], config, tmp_path / "out", progress=False)
    assert len(failures) == 0
    pipelines = {row.family: json.loads(row.params)["pipeline"] for row in rows.itertuples()}
    assert pipelines == {"sd_img2img": "tiny-random-img2img", "sd_inpaint": "my-inpainting"}


def test_resume_remakes_images_whose_plan_changed(source_table, tmp_path):
    """Same ids, other sources or settings (02 re-run, strength changed): never a stale image."""
    out = tmp_path / "out"
    config = EnrichmentConfig(families=("colour_background", "sd_img2img"), images_per_family=2, sd_image_size=64,
                              source_splits=ALL_SPLITS)
    first, _ = enrich_dataset(source_table.iloc[:3], config, out, progress=False)
    other_sources, _ = enrich_dataset(source_table.iloc[3:5], config, out, progress=False)
    assert list(other_sources["path"]) == list(first["path"])  # the same file names ...
    assert set(other_sources["parent"]) <= set(source_table["path"].iloc[3:5])  # ... remade from the new sources
    assert not set(other_sources["hash"]) & set(first["hash"])
    stronger = EnrichmentConfig(families=config.families, images_per_family=2, sd_image_size=64, strength=0.9,
                                source_splits=ALL_SPLITS)
    again, _ = enrich_dataset(source_table.iloc[3:5], stronger, out, progress=False)
    changed = again.set_index("family")["hash"] != other_sources.set_index("family")["hash"]
    assert changed.groupby(level=0).all().to_dict() == {"colour_background": False, "sd_img2img": True}
    assert "_fingerprint" not in again.columns


@pytest.mark.slow
def test_processes_split_the_work_under_torchrun(resplit_world, tmp_path):
    """Two processes (torchrun, as accelerate launch does on GPUs) each make their share; the
    edits are the same files a single process makes."""
    import os
    import subprocess
    import sys

    args = ["--run-dir", str(tmp_path / "run"), "--families", "colour_background", "resample", "sd_img2img",
            "--images-per-family", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dfd_lib.synth.cli", "--out-dir", str(tmp_path / "two"), *args],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-8000:]  # the processes' own messages come before torchrun's summary
    assert "augment[0]" in done.stderr and "augment[1]" in done.stderr
    assert done.stdout.count("9 images in") == 1  # gathered, reported once
    _, resplits = resplit_world
    config = EnrichmentConfig(families=("colour_background", "resample"), images_per_family=3)
    alone, _ = enrich_dataset(resplits, config, tmp_path / "one", progress=False)
    two = {p.name: file_sha1(p) for p in (tmp_path / "two").glob("[cr]*/*.png")}
    assert two == {Path(p).name: h for p, h in zip(alone["path"], alone["hash"])}
    assert len(list((tmp_path / "two" / "sd_img2img").glob("*.png"))) == 3


def test_the_tiny_random_weight_pipeline_is_named_in_the_log_the_family_table_and_the_report(source_table, tmp_path, caplog):
    """Without sd_checkpoint the "Stable Diffusion" families come from random weights: say so wherever they show."""
    from dfd_lib.core import runs
    from dfd_lib.pipeline.report import write_report
    from dfd_lib.synth.stable_diffusion import pipeline_label

    note = "random-weight pipeline: not Stable Diffusion images"
    config = EnrichmentConfig(families=("colour_background", "sd_img2img"), images_per_family=1, sd_image_size=64)
    rows, failures = enrich_dataset(source_table.iloc[:5], config, tmp_path / "out", progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"sd_img2img: {note} (the tiny pipeline: no sd_checkpoint given)" in "\n".join(warned), warned
    counts = family_counts(rows, failures, config)
    assert counts["note"].to_dict() == {"colour_background": "", "sd_img2img": note}
    assert family_counts(rows, failures, {"sd_checkpoint": "org/real-sd"})["note"].to_dict() == {
        "colour_background": "", "sd_img2img": ""}  # a real checkpoint: nothing to say
    assert family_counts(rows, failures, {"sd_checkpoint": "tiny:.cache/sd"}).loc["sd_img2img", "note"] == note
    assert pipeline_label(None) == f"tiny-random ({note})" and pipeline_label("org/real-sd") == "org/real-sd"

    # the report shows notebook 03's family table and its records as the notebook saves them
    run = runs.open_run(tmp_path / "run")
    run.save_table(counts, "03_family_counts")
    run.record_metrics(runs.AUGMENT.name, {"pipeline": pipeline_label(config.checkpoint_for("img2img"))})
    page = write_report(run.root, render_notebooks=False).read_text(encoding="utf-8")
    assert page.count(note) == 2  # the family table's note and the recorded pipeline
