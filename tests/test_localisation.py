"""Localisation heads (issue 28, items 2 and 3): the masks through the training data's geometric transform,
the ``mask`` loss term (off by default; rows without a mask contribute nothing), a tiny training that learns
a splice mask, the heads saved and loaded with the mixture, the Predictor's maps, the training key, the
pixel-level metrics, and notebook 04 on the smoke profile with the heads on."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_training import one_torch_thread

from dfd_lib.data.datasets import ManifestDataset, TrainAugmentConfig, collate_skipping_unreadable
from dfd_lib.evaluation.localisation import localisation_summary, partial_mask_rows, pixel_scores
from dfd_lib.models.checkpoints import CONFIG_FILE, load_expert, load_mixture, mixture_from_experts, save_mixture
from dfd_lib.models.experts import Expert, MixtureOfExperts
from dfd_lib.models.localisation import HEAD_PREFIX, feature_grid, mask_map, patch_grid
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.stats.bootstrap import BootstrapConfig
from dfd_lib.training.losses import LossConfig, MultiLoss
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import train_expert
from dfd_lib.training.training_key import training_key
from dfd_lib.training.tuning import freeze_all_but_head

BACKBONE = "test_efficientnet"
SIZE = 64  # test_efficientnet's feature map at 64 px: 2x2


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def _write(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def spliced(tmp_path_factory) -> pd.DataFrame:
    """24 noisy 48x48 images, real and fake in turn; each fake has a bright 24x24 square pasted in one of its
    four quarters (a splice) and its mask, 255 there."""
    root = tmp_path_factory.mktemp("spliced")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        image = rng.integers(0, 120, (48, 48, 3), dtype=np.uint8)
        row = {"label": i % 2, "family": "splice" if i % 2 else "real", "mask": ""}
        if i % 2:
            top, left = 24 * ((i // 2) % 2), 24 * ((i // 4) % 2)
            image[top:top + 24, left:left + 24] = 240
            mask = np.zeros((48, 48), np.uint8)
            mask[top:top + 24, left:left + 24] = 255
            row["mask"] = _write(root / f"mask_{i}.png", mask)
        row["path"] = _write(root / f"image_{i}.png", image)
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the data


def test_the_mask_goes_through_the_images_crop_resize_and_flip(tmp_path):
    """An image whose red channel IS its (asymmetric) mask: after the training transform the red channel,
    un-normalised, is the transformed mask, for every drawn crop and flip."""
    mask = np.zeros((40, 56), np.uint8)
    mask[5:20, 3:30] = 255
    mask[30:38, 40:50] = 255
    image = np.zeros((40, 56, 3), np.uint8)
    image[..., 0] = mask
    table = pd.DataFrame([{"path": _write(tmp_path / "i.png", image), "label": 1, "mask": _write(tmp_path / "m.png", mask)}])
    dataset = ManifestDataset(table, 32, train=True, mean=(0, 0, 0), std=(1, 1, 1), masks=True,
                              augment=TrainAugmentConfig(crop_scale=(0.3, 1.0)), seed=5)
    flips = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert item["has_mask"] and item["mask"].shape == (1, 32, 32)
        np.testing.assert_allclose(item["image"][0].numpy(), item["mask"][0].numpy(), atol=1e-5)
        left_heavy = item["mask"][0, :, :16].sum() > item["mask"][0, :, 16:].sum()
        flips.add(bool(left_heavy))
    assert flips == {True, False}  # both a flipped and an unflipped draw were checked
    plain = ManifestDataset(table, 32, train=False, mean=(0, 0, 0), std=(1, 1, 1), masks=True)[0]
    np.testing.assert_allclose(plain["image"][0].numpy(), plain["mask"][0].numpy(), atol=1e-5)


def test_a_dataset_with_masks_gives_the_same_images(spliced):
    """Masks on or off, the images (and their augmentation draws) are the same."""
    with_masks = ManifestDataset(spliced, 32, train=True, seed=1, masks=True)
    without = ManifestDataset(spliced, 32, train=True, seed=1)
    for index in (0, 1, 5):
        assert torch.equal(with_masks[index]["image"], without[index]["image"])
        assert "mask" not in without[index]


def test_rows_without_a_usable_mask_have_none_and_are_reported(spliced, tmp_path):
    table = spliced.iloc[:4].copy()
    table.loc[1, "mask"] = str(tmp_path / "missing.png")
    table.loc[3, "mask"] = _write(tmp_path / "small.png", np.zeros((8, 8), np.uint8))  # not its image's size
    dataset = ManifestDataset(table, 32, masks=True)
    batch = collate_skipping_unreadable([dataset[i] for i in range(4)])
    assert batch["mask"].shape == (4, 1, 32, 32) and batch["has_mask"].tolist() == [False] * 4
    assert float(batch["mask"].abs().sum()) == 0
    assert [path for path, _ in batch["mask_skipped"]] == [table.loc[1, "mask"], table.loc[3, "mask"]]
    good = collate_skipping_unreadable([dataset[0], ManifestDataset(spliced, 32, masks=True)[1]])
    assert good["has_mask"].tolist() == [False, True] and good["mask_skipped"] == []


# --------------------------------------------------------------------------- the head and the loss term


def test_heads_are_off_by_default_and_keep_the_released_layout():
    expert = Expert(BACKBONE)
    assert expert.head_kind is None and not any(k.startswith(HEAD_PREFIX) for k in expert.state_dict())
    assert set(expert(torch.zeros(2, 3, SIZE, SIZE))) == {"logits", "features"}
    assert LossConfig().weights["mask"] == 0 and "mask_weight" not in LossConfig().to_dict()
    assert "mask_weight" not in json.dumps(TrainConfig().to_dict())
    headed = Expert(BACKBONE, localisation_head="light")
    extra = {k for k in headed.state_dict() if k.startswith(f"{HEAD_PREFIX}.")}
    assert extra and set(headed.state_dict()) - extra == set(expert.state_dict())
    assert headed(torch.zeros(2, 3, SIZE, SIZE))["mask_logits"].shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="localisation head must be one of"):
        Expert(BACKBONE, localisation_head="unet")


def test_a_vit_head_reads_its_patch_tokens_on_their_grid():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # a class token and 2x2 patches
    grid = patch_grid(tokens, prefix=1)
    assert grid.shape == (2, 3, 2, 2) and torch.equal(grid[0, :, 0, 1], tokens[0, 2])
    vit = Expert("test_vit", localisation_head="linear")
    features = vit.baseline_extractor.forward_features(torch.zeros(1, 3, 160, 160))
    assert feature_grid(vit.baseline_extractor, features).shape[-2:] == (10, 10)
    assert vit(torch.zeros(1, 3, 160, 160))["mask_logits"].shape == (1, 1, 10, 10)


def _mask_batch(n: int = 4):
    torch.manual_seed(0)
    images = torch.randn(n, 3, SIZE, SIZE)
    masks = torch.zeros(n, 1, SIZE, SIZE)
    masks[:, :, :32, :32] = 1
    return images, torch.tensor([1, 0] * (n // 2)), masks


def test_rows_without_a_mask_contribute_nothing():
    torch.manual_seed(0)
    model = Expert(BACKBONE, localisation_head="light")
    images, labels, masks = _mask_batch()
    loss = MultiLoss(LossConfig(kl_weight=0, nce_weight=0, mask_weight=1.0))
    none = loss(model, images, labels, masks=masks, has_mask=torch.zeros(4, dtype=torch.bool))
    assert none["mask"].item() == 0
    none["mask"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.localisation_head.parameters())
    # a mixed batch: the rows without a mask change nothing, whatever their "mask" holds
    has = torch.tensor([True, False, True, False])
    scrambled = masks.clone()
    scrambled[~has] = torch.rand(2, 1, SIZE, SIZE)
    a = loss(model, images, labels, masks=masks, has_mask=has)["mask"]
    b = loss(model, images, labels, masks=scrambled, has_mask=has)["mask"]
    assert a.item() > 0 and torch.equal(a, b)
    assert loss(model, images, labels)["mask"].item() == 0  # a batch that carries no masks at all
    with pytest.raises(ValueError, match="needs experts with a localisation head"):
        loss(Expert(BACKBONE), images, labels, masks=masks, has_mask=has)


def test_the_kl_terms_noisy_copies_leave_the_mask_term_on_the_clean_rows():
    torch.manual_seed(0)
    model = Expert(BACKBONE, localisation_head="linear").eval()
    images, labels, masks = _mask_batch()
    has = torch.ones(4, dtype=torch.bool)
    alone = MultiLoss(LossConfig(kl_weight=0, mask_weight=1.0))(model, images, labels, masks=masks, has_mask=has)
    with_kl = MultiLoss(LossConfig(kl_weight=1.0, kl_fraction=0.5, mask_weight=1.0))(model, images, labels, masks=masks,
                                                                                     has_mask=has)
    assert with_kl["kl"].item() >= 0
    torch.testing.assert_close(with_kl["mask"], alone["mask"])


# --------------------------------------------------------------------------- training, saving, maps


def _config(**overrides) -> TrainConfig:
    loss = LossConfig(ce_weight=1.0, nce_weight=0.0, kl_weight=0.0, mask_weight=1.0, mask_head="light")
    settings = dict(backbone=BACKBONE, pretrained=False, image_size=SIZE, epochs=4, batch_size=6, lr=1e-2, warmup_epochs=0.0,
                    seed=1, progress=False, log_with="", loss=loss,
                    augment=TrainAugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=True))
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(spliced, tmp_path_factory):
    with one_torch_thread():
        out = tmp_path_factory.mktemp("trained") / "expert"
        # validated on fakes only (selection by validation loss: on 4 images the AUC is 1 from the first epoch on),
        # with a short EMA, so the kept weights are a later epoch's
        val = spliced.iloc[20:][spliced.iloc[20:]["label"] == 1]
        return train_expert(spliced.iloc[:20], val, _config(ema_decay=0.5), out)


def test_a_tiny_training_learns_the_splice_masks(trained, spliced):
    history = trained.history
    assert history["train_mask"].iloc[-1] < history["train_mask"].iloc[0]
    expert, meta = load_expert(trained.best_weights)
    assert meta["localisation_head"] == "light" and expert.head_kind == "light"
    # on the training fakes the map is high on the spliced quarter, low elsewhere: far better than chance
    # (a map calling every pixel edited scores F1 0.4 here, a quarter guessed at random 0.25 on average)
    dataset = ManifestDataset(spliced.iloc[:20], SIZE, masks=True)
    inside, outside, f1 = [], [], []
    with torch.no_grad():
        for i in range(1, 20, 2):
            item = dataset[i]
            predicted = mask_map(expert(item["image"][None])["mask_logits"], SIZE)[0]
            inside.append(float(predicted[item["mask"][0] > 0.5].mean()))
            outside.append(float(predicted[item["mask"][0] <= 0.5].mean()))
            f1.append(pixel_scores(predicted.numpy(), item["mask"][0].numpy() > 0.5)["f1"])
    assert np.mean(inside) > np.mean(outside) + 0.3 and np.mean(f1) > 0.6


def test_an_unusable_mask_is_reported_and_its_row_still_trains(spliced, tmp_path):
    rows = spliced.iloc[:8].copy()
    rows.loc[1, "mask"] = str(tmp_path / "gone.png")
    result = train_expert(rows, spliced.iloc[20:], _config(epochs=1), tmp_path / "run")
    skipped = dict(zip(result.skipped["path"], result.skipped["reason"]))
    assert list(skipped) == [rows.loc[1, "mask"]] and skipped[rows.loc[1, "mask"]].startswith("mask not used")
    assert result.history.loc[0, "train_images"] == 6  # one batch of 6 (drop_last): the row was not dropped for its mask


def test_the_head_trains_in_every_tuning_mode():
    expert = Expert(BACKBONE, localisation_head="linear")
    freeze_all_but_head(expert)  # what frozen, lora and effort start from
    assert all(p.requires_grad for p in expert.localisation_head.parameters())
    assert not all(p.requires_grad for p in expert.baseline_extractor.parameters())


def test_the_mask_term_and_the_masks_enter_the_key_only_when_on(spliced, tmp_path):
    rows, val = spliced.iloc[:20], spliced.iloc[20:]
    off = training_key(rows, val, _config(loss=LossConfig()), "random")
    assert "masks" not in off
    on = training_key(rows, val, _config(), "random")
    assert "masks" in on and on["config"] != off["config"]
    changed = rows.copy()
    mask = np.zeros((48, 48), np.uint8)
    mask[:10, :10] = 255
    changed.loc[1, "mask"] = _write(tmp_path / "other_mask.png", mask)
    assert training_key(changed, val, _config(), "random")["masks"] != on["masks"]
    assert training_key(changed, val, _config(loss=LossConfig()), "random") == off


def test_a_mixture_with_heads_saves_loads_and_maps(trained, spliced, tmp_path):
    model, config = mixture_from_experts([trained.best_weights, trained.best_weights])
    assert config.localisation_head == "light"
    save_mixture(model, tmp_path / "moe", config)
    saved = json.loads((tmp_path / "moe" / CONFIG_FILE).read_text())
    assert saved["localisation_head"] == "light"
    loaded, loaded_config = load_mixture(tmp_path / "moe")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model.eval()(x), loaded(x)
    assert a["mask"].shape == (2, SIZE, SIZE)
    torch.testing.assert_close(a["mask"], b["mask"])
    # the mixture's map is the mean of its experts' maps
    with torch.no_grad():
        one = mask_map(loaded.experts[0](x)["mask_logits"], SIZE)
    torch.testing.assert_close(b["mask"], one)
    predictor = Predictor(loaded, loaded_config, device="cpu")
    maps = predictor.predict_maps([spliced.loc[1, "path"], tmp_path / "missing.png"])
    assert predictor.has_maps and maps[0].shape == (48, 48) and maps[1] is None
    assert 0 <= maps[0].min() and maps[0].max() <= 1
    # without heads: the config file as before heads existed, no maps
    plain = MixtureOfExperts([Expert(BACKBONE)])
    plain_config = type(config)(backbones=[BACKBONE], image_size=SIZE)
    save_mixture(plain, tmp_path / "plain", plain_config)
    assert "localisation_head" not in json.loads((tmp_path / "plain" / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="no localisation heads"):
        Predictor(*load_mixture(tmp_path / "plain"), device="cpu").predict_maps([spliced.loc[1, "path"]])
    with pytest.raises(ValueError, match="localisation head"):
        save_mixture(plain, tmp_path / "wrong", type(config)(backbones=[BACKBONE], image_size=SIZE, localisation_head="light"))


# --------------------------------------------------------------------------- the metrics


def test_pixel_f1_and_iou_on_hand_made_masks():
    truth = np.zeros((4, 4), bool)
    truth[:2, :2] = True  # 4 pixels
    predicted = np.zeros((4, 4))
    predicted[:2, :3] = 0.9  # 6 pixels, 4 of them right
    predicted[3, 3] = 0.4  # below the threshold
    assert pixel_scores(predicted, truth) == {"f1": 2 * 4 / (6 + 4), "iou": 4 / 6}
    assert pixel_scores(np.zeros((4, 4)), truth) == {"f1": 0.0, "iou": 0.0}
    assert pixel_scores(truth.astype(float), truth) == {"f1": 1.0, "iou": 1.0}
    with pytest.raises(ValueError, match="shape"):
        pixel_scores(np.zeros((2, 2)), truth)


def test_family_means_with_bootstrap_intervals():
    scores = pd.DataFrame({"family": ["a", "a", "a", "b"], "f1": [0.2, 0.4, 0.6, 1.0], "iou": [0.1, 0.2, 0.3, 1.0]})
    summary = localisation_summary(scores, BootstrapConfig(bootstrap_resamples=200, seed=0)).set_index("family")
    assert summary.loc["a", "n"] == 3 and summary.loc["a", "f1"] == pytest.approx(0.4)
    assert summary.loc["a", "f1_lo"] < 0.4 < summary.loc["a", "f1_hi"]
    assert 0.2 <= summary.loc["a", "f1_lo"] and summary.loc["a", "f1_hi"] <= 0.6
    assert summary.loc["b", "f1_lo"] == summary.loc["b", "f1_hi"] == 1.0  # one image: no spread
    assert summary.loc["all", "n"] == 4 and summary.loc["all", "iou"] == pytest.approx(0.4)
    off = localisation_summary(scores, BootstrapConfig(bootstrap_resamples=0)).set_index("family")
    assert np.isnan(off.loc["a", "f1_lo"])


def test_only_fakes_with_a_partial_mask_are_scored(spliced, tmp_path):
    table = spliced.iloc[:4].copy()
    table.loc[3, "mask"] = _write(tmp_path / "whole.png", np.full((48, 48), 255, np.uint8))  # a regenerated fake
    kept = partial_mask_rows(table)
    assert list(kept.index) == [1] and kept.loc[1, "mask_share"] == pytest.approx(0.25)
    assert partial_mask_rows(table.drop(columns="mask")).empty


# --------------------------------------------------------------------------- notebook 04 with the heads on


@pytest.mark.slow
@pytest.mark.notebook
def test_notebook_04_on_the_smoke_profile_with_heads_reports_pixel_scores_per_family(smoke_run, tmp_path):
    """The smoke profile with ``mask_weight`` 1 (01-03 those of the session's reference smoke run, whose factory
    wrote the masks): every expert has a head, the mixture saves them, and notebook 04 reports pixel F1 and IoU per
    test family with intervals and draws the grid of true against predicted masks. Step 04 again with the heads
    off: no heads, no pixel figures, and the mixture's image-level test AUC with the heads lies within the interval
    of the one without."""
    from dfd_lib.core import runs  # deferred: the pipeline's modules are only needed by this slow test
    from dfd_lib.pipeline.chain import run_pipeline  # deferred: as above

    run_dir = tmp_path / "reports" / "localisation"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns(runs.EXPERTS_DIR, "weights"))
    overrides = {"04.ladder_seeds": "0", "04.run_ablation": "false", "04.robustness": "false"}
    result = run_pipeline(run=str(run_dir), start="04", overrides={**overrides, "04.mask_weight": "1.0"},
                          progress=False, write_report=False)
    assert result.ok, [step.error for step in result.steps]
    run = runs.RunDir(result.run_dir)
    config = json.loads((run.path(runs.MOE_WEIGHTS) / CONFIG_FILE).read_text())
    assert config["localisation_head"] == "light"
    histories = [pd.read_csv(path) for path in sorted(run.path(runs.EXPERTS_DIR).glob("expert_*/history.csv"))]
    assert histories and all((history["train_mask"] > 0).all() for history in histories)  # the masks were read and learned from
    summary = pd.read_csv(run.table("04_localisation"))
    assert "all" in set(summary["family"]) and len(summary) >= 2  # at least one family, and all of them together
    for metric in ("f1", "iou"):
        assert summary[metric].between(0, 1).all()
        assert (summary[f"{metric}_lo"] <= summary[metric] + 1e-12).all() and (summary[metric] <= summary[f"{metric}_hi"] + 1e-12).all()
    assert run.figure("04_localisation").is_file()
    with_heads = pd.read_csv(run.table("04_headline"), index_col="model")

    result = run_pipeline(None, run="localisation", overrides={**overrides, "04.mask_weight": "0.0"},
                          reports_dir=tmp_path / "reports", progress=False, write_report=False)
    assert result.ok, [step.error for step in result.steps]
    assert "localisation_head" not in json.loads((run.path(runs.MOE_WEIGHTS) / CONFIG_FILE).read_text())
    assert pd.read_csv(run.table("04_localisation")).empty
    without = pd.read_csv(run.table("04_headline"), index_col="model")
    mixture = [name for name in with_heads.index if name.startswith("mixture")][0]
    columns = ["test_auc", "test_auc_lo", "test_auc_hi"]
    print(summary.to_string(), "with heads:", with_heads[columns].to_string(), "without:", without[columns].to_string(), sep="\n")
    assert without.loc[mixture, "test_auc_lo"] <= with_heads.loc[mixture, "test_auc"] <= without.loc[mixture, "test_auc_hi"]
