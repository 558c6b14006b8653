"""The embedded demo dataset: deterministic, offline, with provenance and a cross-domain test set."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from dfd_lib.sources.demo import DemoConfig, build_demo_dataset, ensure_demo_dataset, read_build_info


@pytest.mark.slow
def test_same_seed_gives_same_content_hashes(smoke_demo, tmp_path):
    again = build_demo_dataset(DemoConfig.smoke(), tmp_path / "again", progress=False)
    assert smoke_demo.table["hash"].tolist() == again.table["hash"].tolist()
    other = build_demo_dataset(DemoConfig.smoke(seed=1), tmp_path / "other", progress=False)
    assert len(set(other.table["hash"]) & set(smoke_demo.table["hash"])) < len(other.table) // 10


def test_families_provenance_and_cross_domain_test(smoke_demo):
    table = smoke_demo.table
    assert len(table) == 200
    fakes, reals = table[table["label"] == 1], table[table["label"] == 0]
    assert set(fakes["family"]) >= {"splice", "colour_background", "resample", "sd_img2img", "self_blend", "sd_inpaint"}
    assert (reals["family"] == "real").all()
    # every fake names its parent real image and shares its group and source
    by_id = reals.assign(id=reals["path"].str.rsplit("/", n=1).str[-1].str[:-4]).set_index("id")
    assert fakes["parent"].isin(by_id.index).all()
    assert (fakes["group"].values == by_id.loc[fakes["parent"], "group"].values).all()
    assert (fakes["source"].values == by_id.loc[fakes["parent"], "source"].values).all()
    for params in fakes["params"]:
        assert json.loads(params)  # the operation's parameters are recorded
    # official split: random train/val; test holds families and sources train/val never contain
    assert set(table["split"]) == {"train", "val", "test"}
    trainval, test = table[table["split"] != "test"], table[table["split"] == "test"]
    assert not set(test["family"]) - {"real"} & set(trainval["family"])
    assert not set(test["source"]) & set(trainval["source"])
    assert test["label"].nunique() == 2 and trainval.groupby("split")["label"].nunique().eq(2).all()
    # a group never straddles the official train/val split
    assert trainval.groupby("group")["split"].nunique().max() == 1


def test_images_on_disk_match_manifest(smoke_demo):
    row = smoke_demo.table.iloc[-1]
    with Image.open(row["path"]) as image:
        assert image.size == (row["width"], row["height"]) == (128, 128)
    assert not pd.isna(smoke_demo.table["hash"]).any()


def test_ensure_reuses_an_identical_build(smoke_demo, tmp_path):
    root = smoke_demo.table["path"].iloc[0].split("/images/")[0]
    info = read_build_info(root)
    assert info["images"] == 200 and "mechanics" in info["note"]
    reused = ensure_demo_dataset(DemoConfig.smoke(), root, progress=False)
    assert reused.table["hash"].tolist() == smoke_demo.table["hash"].tolist()


def test_config_is_validated():
    with pytest.raises(ValueError, match="cross-domain"):
        DemoConfig(test_families=("splice",))
    with pytest.raises(ValueError, match="unknown family"):
        DemoConfig(trainval_families=("morphing",))
    with pytest.raises(ValueError, match="fake_fraction"):
        DemoConfig(fake_fraction=1.5)


@pytest.mark.slow
def test_a_changed_demo_file_is_rebuilt_not_trusted(tmp_path, caplog):
    # the demo is a build whose manifest's hashes every later step trusts (the embedding cache keys on
    # them): a file changed after the build must not pass under its recorded hash
    built = build_demo_dataset(DemoConfig.smoke(), tmp_path / "demo", progress=False)
    victim = built.table["path"].iloc[3]
    original = open(victim, "rb").read()
    Image.new("RGB", (128, 128), (255, 0, 0)).save(victim, format="PNG")
    with caplog.at_level("WARNING", logger="dfd_lib"):
        again = ensure_demo_dataset(DemoConfig.smoke(), tmp_path / "demo", progress=False)
    assert "differs from its build (1 file(s) changed" in caplog.text and victim in caplog.text
    assert open(victim, "rb").read() == original and again.table["hash"].tolist() == built.table["hash"].tolist()
