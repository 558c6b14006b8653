"""Embedding extraction streams to a cache, reports bad files, reruns from the cache, and hands
notebook 02 exactly the embeddings notebook 01 mapped."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from hub_cache import cache_timm_weights, use_hub_cache
from PIL import Image
from torchvision.transforms import v2

from dfd_lib.core import runs
from dfd_lib.data.manifest import Manifest
from dfd_lib.embed.embedding_store import load_run_embeddings
from dfd_lib.embed.embeddings import EmbeddingConfig, embed_run, extract_embeddings
from dfd_lib.embed.separability import class_spread, domain_separability
from dfd_lib.models.backbones import create_backbone


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def images(tmp_path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(9):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    paths.insert(4, str(corrupt))
    return pd.DataFrame({"path": paths, "label": [i % 2 for i in range(10)]}, index=range(100, 110))


class _Counted(torch.nn.Module):
    """A tiny backbone that counts its forward calls and returns an Expert-style dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = create_backbone("resnet10t", pretrained=False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return {"logits": None, "features": self.net(x)}


def test_extract_caches_and_skips_corrupt(images, tmp_path):
    model = _Counted()
    config = EmbeddingConfig(image_size=32, batch_size=4, num_workers=1, device="cpu")
    kwargs = dict(cache_dir=tmp_path / "cache", model=model, progress=False)
    first = extract_embeddings(images, config, **kwargs)
    assert model.calls == 3 and not first.from_cache
    assert first.embeddings.shape == (9, model.net.num_features) and first.embeddings.dtype == np.float32
    assert isinstance(first.embeddings, np.memmap)
    assert first.failed["path"].str.endswith("corrupt.jpg").tolist() == [True]
    assert first.failed["reason"].iloc[0]
    assert 104 not in first.table.index and len(first.table) == 9
    # Row order matches the table: embedding a single image alone gives its row.
    alone = extract_embeddings(images.iloc[[5]], config, **kwargs)
    np.testing.assert_allclose(alone.embeddings[0], first.embeddings[4], rtol=1e-4, atol=1e-5)

    calls = model.calls
    again = extract_embeddings(images, config, **kwargs)
    assert again.from_cache and model.calls == calls
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    # Another image size is another cache entry.
    extract_embeddings(images, EmbeddingConfig(image_size=48, batch_size=4, num_workers=1, device="cpu"), **kwargs)
    assert model.calls > calls


def test_changed_weights_miss_the_cache(images, tmp_path):
    model = _Counted()
    config = EmbeddingConfig(image_size=32, batch_size=8, num_workers=0, device="cpu")
    extract_embeddings(images, config, cache_dir=tmp_path, model=model, progress=False)
    with torch.no_grad():
        model.net.conv1[0].weight.mul_(2)
    assert not extract_embeddings(images, config, cache_dir=tmp_path, model=model, progress=False).from_cache


def test_extract_by_name(images, tmp_path):
    config = EmbeddingConfig("test_efficientnet", pretrained=False, image_size=32, batch_size=16, num_workers=0, device="cpu")
    result = extract_embeddings(images, config, cache_dir=tmp_path, progress=False)
    assert result.embeddings.shape[0] == 9 and np.isfinite(result.embeddings).all()


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="'path' column"):
        extract_embeddings(pd.DataFrame({"file": ["x"]}), EmbeddingConfig("resnet10t"), cache_dir=tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        extract_embeddings(pd.DataFrame({"path": [str(bad)]}),
                           EmbeddingConfig("resnet10t", pretrained=False, image_size=32, num_workers=0, device="cpu"),
                           cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        EmbeddingConfig(batch_size=0)


def test_domain_separability_overlap_vs_shift():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(600, 16))
    is_val = rng.random(600) < 0.3
    assert abs(domain_separability(emb, is_val) - 0.5) < 0.1
    assert domain_separability(emb + 3.0 * is_val[:, None], is_val) > 0.95
    with pytest.raises(ValueError, match="both domains"):
        domain_separability(emb, np.zeros(600, bool))


def test_class_spread_sees_wider_fakes():
    rng = np.random.default_rng(0)
    reals = rng.normal(size=(300, 8))
    fakes = np.concatenate([rng.normal(size=(50, 8)) + 8 * rng.normal(size=(1, 8)) for _ in range(6)])
    spread = class_spread(np.concatenate([reals, fakes]), np.r_[np.zeros(300), np.ones(300)], n_clusters=12)
    assert spread.loc[1.0, "pairwise_distance"] > 2 * spread.loc[0.0, "pairwise_distance"]
    assert spread.loc[1.0, "clusters_for_90pct"] >= spread.loc[0.0, "clusters_for_90pct"]
    assert spread.loc[1.0, "centroid_distance"] > spread.loc[0.0, "centroid_distance"]


def test_split_separability_reads_overlap_and_domain_shift():
    import numpy as np
    import pandas as pd

    from dfd_lib.embed.embedding_store import EmbeddingResult
    from dfd_lib.embed.separability import split_separability

    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(size=(120, 8)), rng.normal(loc=6.0, size=(40, 8))]).astype(np.float32)
    split = ["train", "val"] * 60 + ["test"] * 40
    table = pd.DataFrame({"path": [f"{i}" for i in range(160)], "split": split, "label": 0})
    result = EmbeddingResult(emb, table, pd.DataFrame(columns=["path", "reason"]), None, False)
    numbers = split_separability(result)
    assert abs(numbers.loc["train vs val", "auc"] - 0.5) < 0.15
    assert numbers.loc["train+val vs test", "auc"] > 0.95
    trainval = result.select(["train", "val"])
    assert len(trainval) == 120 and set(trainval.table["split"]) == {"train", "val"}


def test_notebook_02_reads_the_embeddings_notebook_01_mapped(images, tmp_path):
    run = runs.open_run(tmp_path / "run")
    with pytest.raises(runs.MissingArtefactError, match="01_features_umap"):
        load_run_embeddings(run)
    manifest = Manifest(images.assign(label=[i % 2 for i in range(len(images))]))
    manifest.save(run.path(runs.MANIFEST))
    table = Manifest.load(run.path(runs.MANIFEST)).table
    config = EmbeddingConfig("test_efficientnet", pretrained=False, image_size=32, batch_size=8, num_workers=0, device="cpu")
    made = embed_run(run, table, config, progress=False)
    # another image size in the same cache folder (as -p 01.image_size=... would make) is not what 02 reads
    extract_embeddings(table, EmbeddingConfig("test_efficientnet", pretrained=False, image_size=48, num_workers=0,
                                              device="cpu"), cache_dir=run.path(runs.EMBEDDINGS_DIR), progress=False)
    read = load_run_embeddings(run)
    assert read.cache_path == made.cache_path and read.from_cache
    np.testing.assert_array_equal(read.embeddings, made.embeddings)
    assert list(read.table["path"]) == list(made.table["path"]) and len(read.failed) == 1  # the corrupt file
    Manifest(table.iloc[:5]).save(run.path(runs.MANIFEST))  # 01's dataset changed without re-embedding
    with pytest.raises(ValueError, match="run step 01 again"):
        load_run_embeddings(run)


def test_a_runs_embeddings_folder_keeps_only_the_entry_its_map_used(images, tmp_path):
    run = runs.open_run(tmp_path / "run")
    table = Manifest(images.assign(label=[i % 2 for i in range(len(images))])).table
    first = embed_run(run, table, EmbeddingConfig("test_efficientnet", pretrained=False, image_size=32, num_workers=0,
                                                  device="cpu"), progress=False)
    second = embed_run(run, table, EmbeddingConfig("test_efficientnet", pretrained=False, image_size=48, num_workers=0,
                                                   device="cpu"), progress=False)
    assert first.cache_path != second.cache_path
    left = sorted(p.name for p in run.path(runs.EMBEDDINGS_DIR).iterdir())
    assert left == sorted([second.cache_path.name, second.cache_path.with_suffix(".json").name, "run.json"])


def test_a_vit_from_the_hub_cache_embeds_with_its_own_preprocessing(images, tmp_path, monkeypatch):
    """Step 01's backbone can be a ViT (as CLIP's ViT-L/14 in the full-foundation profile): a tiny
    random-weight one in a locally built cache, embedded at its own side (``image_size: 0``) with its
    own mean, std and interpolation, keyed on its name."""
    hub = use_hub_cache(monkeypatch, tmp_path / "hf-home")
    cache_timm_weights(hub, "test_vit.r160_in1k")
    cache_timm_weights(hub, "test_vit2.r160_in1k")
    config = EmbeddingConfig("test_vit.r160_in1k", image_size=0, batch_size=4, num_workers=0, device="cpu")
    result = extract_embeddings(images, config, cache_dir=tmp_path / "cache", progress=False)
    assert result.weights_source.startswith("hub:timm/test_vit.r160_in1k@")
    key = json.loads(result.cache_path.with_suffix(".json").read_text())["key"]
    assert (key["image_size"], key["mean"], key["std"], key["interpolation"]) == (160, [0.5] * 3, [0.5] * 3, "bicubic")

    # row 5 by hand: shorter side to 160 px (bicubic), centre crop, normalised by the model's 0.5/0.5
    model = create_backbone("test_vit.r160_in1k", num_classes=0).eval()
    by_hand = v2.Compose([v2.PILToTensor(), v2.Resize(160, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                          v2.CenterCrop(160), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    with torch.no_grad():
        expected = model(by_hand(Image.open(images["path"].iloc[5]).convert("RGB"))[None])[0].numpy()
    np.testing.assert_allclose(result.embeddings[4], expected, rtol=1e-3, atol=1e-3)

    own_side = EmbeddingConfig("test_vit.r160_in1k", image_size=160, batch_size=4, num_workers=0, device="cpu")
    assert extract_embeddings(images, own_side, cache_dir=tmp_path / "cache", progress=False).from_cache  # one entry
    other = EmbeddingConfig("test_vit2.r160_in1k", image_size=0, batch_size=4, num_workers=0, device="cpu")
    assert not extract_embeddings(images, other, cache_dir=tmp_path / "cache", progress=False).from_cache
    with pytest.raises(ValueError, match="test_vit takes 160 px inputs only.*set image_size to 160 or 0"):
        extract_embeddings(images, EmbeddingConfig("test_vit.r160_in1k", image_size=64, num_workers=0, device="cpu"),
                           cache_dir=tmp_path / "cache", progress=False)
