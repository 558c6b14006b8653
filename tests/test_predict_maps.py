"""``dfd predict --maps DIR`` (issue 28, item 4): each photo's localisation map as a PNG at its resolution, named
in the CSV's ``map`` column; the map is the Predictor's, and a mixture trained to localise puts it on the splice;
corrupt files and videos get no map; a mixture without heads, a converted backend and ``--faces`` are refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_localisation import one_thread, spliced, trained  # noqa: F401 (fixtures: the tiny training that learns splices)
from test_serve import make_tiny_weights

from dfd_lib.cli import main as dfd_main
from dfd_lib.models.checkpoints import mixture_from_experts, save_mixture
from dfd_lib.scoring.maps import map_file_name, read_map
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.scoring.videos import write_video

HEIGHT, WIDTH = 72, 96  # not the model's 64 x 64, nor square: the maps must come back at this size


@pytest.fixture(scope="module")
def localising_weights(trained, tmp_path_factory) -> Path:  # noqa: F811
    """A one-expert mixture of the expert that learnt the splice masks."""
    model, config = mixture_from_experts([trained.best_weights])
    return save_mixture(model, tmp_path_factory.mktemp("moe_heads"), config)


def splice(seed: int, edited: bool) -> np.ndarray:
    """A noisy image like the training's; ``edited``: a bright block pasted over its top-left quarter."""
    image = np.random.default_rng(seed).integers(0, 120, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    if edited:
        image[: HEIGHT // 2, : WIDTH // 2] = 240
    return image


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(splice(1, edited=True)).save(root / "edited.png")
    Image.fromarray(splice(2, edited=True)).save(root / "sub" / "edited.png")  # the same name in another folder
    Image.fromarray(splice(3, edited=False)).save(root / "clean.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    write_video(root / "clip.avi", [np.full((HEIGHT, WIDTH, 3), 30 * i, np.uint8) for i in range(3)])
    return root


def test_predict_writes_each_photos_map_where_the_splice_is(localising_weights, folder, tmp_path, capsys):
    out, maps = tmp_path / "preds.csv", tmp_path / "maps"
    code = dfd_main(["predict", str(folder), "--weights", str(localising_weights), "--out", str(out),
                     "--maps", str(maps), "--batch-size", "2", "--frames", "2"])
    assert code == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert table.columns[-1] == "map"
    rows = {str(Path(p).relative_to(folder)): row for p, row in zip(table["path"], table.to_dict("records"))}
    assert rows["broken.jpg"]["map"] == "" and rows["broken.jpg"]["error"] != ""  # reported, skipped, no map
    assert rows["clip.avi"]["map"] == "" and rows["clip.avi"]["kind"] == "video"  # photos only
    photos = ["edited.png", "sub/edited.png", "clean.png"]
    assert sorted(p.name for p in maps.iterdir()) == sorted(map_file_name(folder / p) for p in photos)
    assert len({rows[p]["map"] for p in photos}) == 3  # same names, different files
    written = {p: read_map(rows[p]["map"]) for p in photos}
    assert all(m.shape == (HEIGHT, WIDTH) for m in written.values())
    # the file is the Predictor's map (8-bit: within one level; the stream scores in batches)
    expected = Predictor.load(localising_weights, device="cpu").predict_maps([folder / p for p in photos])
    for p, full in zip(photos, expected):
        assert np.abs(written[p] - full).max() <= 1 / 255 + 1e-6
    # a mixture trained to localise puts the map's mass on the spliced quarter
    inside = np.zeros((HEIGHT, WIDTH), bool)
    inside[: HEIGHT // 2, : WIDTH // 2] = True
    for p in ("edited.png", "sub/edited.png"):
        assert written[p][inside].mean() > written[p][~inside].mean() + 0.2
    assert "localisation maps ->" in capsys.readouterr().out


def test_resuming_keeps_the_map_column_and_writes_only_the_missing_maps(localising_weights, folder, tmp_path):
    out, maps = tmp_path / "preds.csv", tmp_path / "maps"
    args = ["predict", str(folder), "--weights", str(localising_weights), "--out", str(out), "--maps", str(maps)]
    assert dfd_main(args) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))  # a crash after two rows
    kept = pd.read_csv(out, keep_default_na=False)
    for name in maps.iterdir():
        name.unlink()
    assert dfd_main([*args, "--resume"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 5 and list(table.columns) == list(kept.columns)
    rescored = table[~table["path"].isin(kept["path"])]
    assert sorted(p.name for p in maps.iterdir()) == sorted(Path(m).name for m in rescored["map"] if m)
    # resuming without --maps onto a CSV with the map column is refused, not mixed
    assert dfd_main(["predict", str(folder), "--weights", str(localising_weights), "--out", str(out), "--resume"]) == 2


def test_maps_are_refused_up_front_where_they_cannot_be_drawn(localising_weights, folder, tmp_path, capsys):
    plain = make_tiny_weights(tmp_path / "plain")  # no localisation heads: the released weights' case
    out = tmp_path / "preds.csv"
    assert dfd_main(["predict", str(folder), "--weights", str(plain), "--out", str(out), "--maps", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no localisation heads" in err and "mask_weight" in err and "Grad-CAM" in err
    assert dfd_main(["predict", str(folder), "--weights", str(localising_weights), "--out", str(out),
                     "--maps", str(tmp_path / "m"), "--backend", "onnxruntime"]) == 2
    assert "--maps needs --backend torch" in capsys.readouterr().err
    assert dfd_main(["predict", str(folder), "--weights", str(localising_weights), "--out", str(out),
                     "--maps", str(tmp_path / "m"), "--faces"]) == 2
    assert "without --faces" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "m").exists()
    # without --maps the mixture without heads scores as before, and the CSV has no map column
    assert dfd_main(["predict", str(folder), "--weights", str(plain), "--out", str(out)]) == 0
    assert "map" not in pd.read_csv(out).columns


@pytest.mark.slow
def test_a_mixture_with_heads_scores_through_openvino_like_torch(localising_weights, folder, tmp_path, monkeypatch):
    """The export keeps the scores only: a mixture with heads scores alike in both backends (its maps, in torch)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the export stays in the test's folder
    tables = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / f"{backend}.csv"
        assert dfd_main(["predict", str(folder), "--weights", str(localising_weights), "--out", str(out),
                         "--backend", backend, "--export-dir", str(tmp_path / "export")]) == 0
        tables[backend] = pd.read_csv(out).set_index("path")
    scored = tables["torch"]["error"].isna()
    assert scored.sum() >= 3
    columns = ["prob_fake", *[c for c in tables["torch"].columns if c.startswith("prob_expert_")]]
    difference = tables["torch"].loc[scored, columns].to_numpy(float) - tables["openvino"].loc[scored, columns].to_numpy(float)
    assert np.abs(difference).max() < 1e-5
