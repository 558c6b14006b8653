"""Every image the fake factory makes records its manipulation mask: exactly the pixels an edit (or an inpainting
that keeps the source outside its mask) changed, the whole image for img2img, none for reals; the manifest's
``mask`` column names it and is checked on load; the demo's masks leave its images unchanged."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data

from dfd_lib.data.manifest import MASK, Manifest, ManifestError, file_sha1
from dfd_lib.sources import demo
from dfd_lib.synth import kinds
from dfd_lib.synth.config import EnrichmentConfig
from dfd_lib.synth.enrichment import enrich_dataset, save_augmented_manifest
from dfd_lib.synth.stable_diffusion import StableDiffusionKind

EVERY_SPLIT = ()  # source_splits drawing from every row


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB") if image.mode != "L" else image)


def _changed(row) -> np.ndarray:
    return (_pixels(row.path) != _pixels(row.parent)).any(axis=2)


@pytest.fixture()
def sources(tmp_path) -> pd.DataFrame:
    """Three reals and one fake that brings its own mask (the left half), all 64x48."""
    rows = []
    for i, photo in enumerate([data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(photo).resize((64, 48)).save(path)
        rows.append(dict(path=str(path), label=int(i == 3), family="splice" if i == 3 else "real", group=f"g{i}",
                         width=64, height=48, hash=file_sha1(path), split="train"))
    mask = np.zeros((48, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "img3_mask.png")
    table = pd.DataFrame(rows)
    table[MASK] = [None, None, None, str(tmp_path / "img3_mask.png")]
    return table


def test_a_splice_and_an_inpainting_record_exactly_the_pixels_they_changed(sources, tmp_path):
    config = EnrichmentConfig(families=("splice", "sd_inpaint"), images_per_family=3, sd_image_size=64, sd_batch_size=3,
                              source_splits=EVERY_SPLIT)
    rows, failures = enrich_dataset(sources, config, tmp_path / "out", progress=False)
    assert failures.empty and sorted(rows["family"].value_counts().tolist()) == [3, 3]
    for row in rows.itertuples():
        mask = _pixels(row.mask)
        assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, _changed(row)), row.path  # exactly the changed pixels
        assert 0 < (mask == 255).mean() < 0.9  # a local edit: part of the image
        assert row.mask == str(tmp_path / "out" / "masks" / row.family / row.path.rsplit("/", 1)[1])  # out of the image folder
    # the manifest stores masks like images (relative below its folder) and reads them back
    saved = save_augmented_manifest(rows, tmp_path / "out" / "augmented.csv")
    assert pd.read_csv(saved)[MASK].str.fullmatch(r"masks/(splice|sd_inpaint)/.*\.png").all()
    assert Manifest.load(saved).table.set_index("path")[MASK].to_dict() == rows.set_index("path")[MASK].to_dict()


def test_img2img_masks_the_whole_image_a_degraded_real_none_and_a_degraded_fake_its_source_s(sources, tmp_path):
    config = EnrichmentConfig(families=("sd_img2img", "degraded"), images_per_family=2, degrade_fake_fraction=0.5,
                              sd_image_size=64, sd_batch_size=2, source_splits=EVERY_SPLIT)
    rows, failures = enrich_dataset(sources, config, tmp_path / "out", progress=False)
    assert failures.empty
    by_family = {family: part for family, part in rows.groupby("family")}
    assert set(by_family) == {"sd_img2img", "degraded", "degraded_fake"}
    for path in by_family["sd_img2img"][MASK]:
        assert (_pixels(path) == 255).all()
    assert by_family["degraded"][MASK].isna().all()  # a real stays unmanipulated
    assert not (tmp_path / "out" / "masks" / "degraded").exists()
    (fake_mask,) = by_family["degraded_fake"][MASK]
    assert np.array_equal(_pixels(fake_mask), _pixels(sources[MASK].iloc[3]))  # the fake's region, still
    with pytest.raises(ValueError, match="must be lower-case"):  # masks/ is the masks' folder, no family's
        kinds.Family("masks", "edit", lambda image, rng: (image, {}))


def test_inpainting_without_keeping_the_outside_records_the_repainted_region(sources, tmp_path):
    region = np.zeros((48, 64), np.uint8)
    region[10:30, 20:50] = 128  # grey: repainted, half blended
    Image.fromarray(region).save(tmp_path / "region.png")
    table = sources.iloc[[0]].assign(inpaint_mask=str(tmp_path / "region.png"))
    config = EnrichmentConfig(families=("sd_inpaint",), images_per_family=1, sd_image_size=64, keep_unmasked=False,
                              source_splits=EVERY_SPLIT)
    rows, failures = enrich_dataset(table, config, tmp_path / "out", progress=False)
    (row,) = rows.itertuples()
    assert np.array_equal(_pixels(row.mask) == 255, region > 0)
    assert _changed(row)[region == 0].any()  # the VAE's decoding moved pixels outside it too: not in the mask


def test_a_sidecar_from_before_masks_is_made_again_with_the_same_pixels(sources, tmp_path):
    config = EnrichmentConfig(families=("splice",), images_per_family=1, source_splits=EVERY_SPLIT)
    (row,) = enrich_dataset(sources, config, tmp_path / "out", progress=False)[0].itertuples()
    sidecar = tmp_path / "out" / "splice" / (row.path.rsplit("/", 1)[1][:-4] + ".json")
    old = json.loads(sidecar.read_text())
    old.pop(MASK)
    sidecar.write_text(json.dumps(old))
    (tmp_path / row.mask).unlink()
    (again,) = enrich_dataset(sources, config, tmp_path / "out", progress=False)[0].itertuples()
    assert again.hash == row.hash and np.array_equal(_pixels(again.mask) == 255, _changed(again))


def test_the_manifest_reports_a_missing_or_wrong_size_mask(tmp_path):
    for name, size in (("a.png", (64, 48)), ("b.png", (64, 48)), ("c.png", (64, 48)), ("b_mask.png", (32, 32)),
                       ("c_mask.png", (64, 48))):
        Image.new("L" if "mask" in name else "RGB", size).save(tmp_path / name)
    table = pd.DataFrame(dict(path=["a.png", "b.png", "c.png"], label=[1, 1, 1], width=[64, 64, 64], height=[48, 48, 48],
                              mask=["gone.png", "b_mask.png", "c_mask.png"]))
    table.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path / "manifest.csv")
    message = str(caught.value)
    assert "2 mask(s) cannot be used" in message
    assert f"mask {tmp_path / 'gone.png'} of {tmp_path / 'a.png'}: missing" in message
    assert f"mask {tmp_path / 'b_mask.png'} is 32x32 but its image {tmp_path / 'b.png'} is 64x48" in message
    loaded = Manifest.load(tmp_path / "manifest.csv", check_masks=False)
    assert loaded.table[MASK].tolist() == [str(tmp_path / n) for n in ("gone.png", "b_mask.png", "c_mask.png")]
    # empty cells are images without a mask; a manifest without the column has none
    table.assign(mask=[None, None, "c_mask.png"]).to_csv(tmp_path / "manifest.csv", index=False)
    assert Manifest.load(tmp_path / "manifest.csv").masked().tolist() == [False, False, True]
    table.drop(columns=MASK).to_csv(tmp_path / "manifest.csv", index=False)
    assert not Manifest.load(tmp_path / "manifest.csv").masked().any()


def test_the_demo_records_every_fake_s_mask_and_none_for_reals(smoke_demo):
    table = smoke_demo.table
    fakes, reals = table[table["label"] == 1], table[table["label"] == 0]
    assert fakes[MASK].notna().all() and reals[MASK].isna().all()
    assert fakes[MASK].str.contains("/masks/").all()
    root = table["path"].iloc[0].split("/images/")[0]
    info = demo.read_build_info(root)
    assert info["masks"] == len(fakes) and info["layout_version"] == demo.LAYOUT_VERSION
    by_id = reals.set_index(reals["path"].str.rsplit("/", n=1).str[-1].str[:-4])["path"]
    for row in fakes.groupby("family").head(2).itertuples():
        mask = _pixels(row.mask) == 255
        if row.family == "sd_img2img":
            assert mask.all()
        else:
            assert np.array_equal(mask, _changed(row._replace(parent=by_id[row.parent]))), row.path


def test_masks_leave_the_demo_images_unchanged_and_an_older_build_is_rebuilt_with_them(tmp_path, monkeypatch, caplog):
    config = demo.DemoConfig(n_images=40)
    with monkeypatch.context() as patched:  # the factory as it was before masks: no mask for anything
        patched.setattr(kinds.ImageKind, "mask", lambda *args: None)
        patched.setattr(kinds.ModelKind, "mask", lambda *args: None)
        patched.setattr(StableDiffusionKind, "mask", lambda *args: None)
        before = demo.build_demo_dataset(config, tmp_path / "demo", progress=False)
    assert not before.masked().any()
    info_path = tmp_path / "demo" / demo.BUILD_INFO
    info = json.loads(info_path.read_text())
    info.pop("layout_version")  # as a build from before masks wrote it
    info_path.write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="dfd_lib"):
        after = demo.ensure_demo_dataset(config, tmp_path / "demo", progress=False)
    assert "built before its fakes recorded their masks" in caplog.text
    assert after.table["hash"].tolist() == before.table["hash"].tolist()  # the very same images
    assert demo.read_build_info(tmp_path / "demo")["content_digest"] == info["content_digest"]
    assert after.masked().sum() == (after.table["label"] == 1).sum()
    # a mask lost since the build is not trusted either: the demo is built again
    Image.new("L", (8, 8)).save(after.table[MASK].dropna().iloc[0])
    caplog.clear()
    with caplog.at_level("WARNING", logger="dfd_lib"):
        again = demo.ensure_demo_dataset(config, tmp_path / "demo", progress=False)
    assert "differs from its build" in caplog.text and "is 8x8 but its image" in caplog.text
    assert again.table["hash"].tolist() == before.table["hash"].tolist()
