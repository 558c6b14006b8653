"""``dfd embed`` and ``dfd cluster`` write what notebooks 01 and 02 write with the same settings: the
run's manifest and embeddings, then its re-splits, compared with the library calls the notebooks make
on a second run folder; their options are their configs' fields, and a bad one stops them with a clear
message and exit status 2."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dfd_lib.cli import COMMANDS
from dfd_lib.cli import main as dfd_main
from dfd_lib.core import runs
from dfd_lib.core.paths import PROJECT_ROOT
from dfd_lib.data.manifest import TRAIN, VAL
from dfd_lib.data.resplit_table import check_no_group_leakage, save_resplits
from dfd_lib.embed import clusters, embedding_store, embeddings, resplits
from dfd_lib.embed.clusters import ClusterConfig
from dfd_lib.embed.embeddings import EmbeddingConfig
from dfd_lib.sources.run_dataset import DatasetSpec, prepare_run_dataset
from dfd_lib.steps import clustering, features

EMBED_OPTIONS = ["--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """real/ and fake/ images from two visual domains (smooth gradients, noise); a fake differs from its
    real only by a faint square, so the clusters follow the domains and each holds both classes."""
    root = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(0)
    for domain in ("smooth", "noisy"):
        for label in ("real", "fake"):
            folder = root / domain / label
            folder.mkdir(parents=True)
            for i in range(10):
                if domain == "smooth":
                    image = np.linspace(0, 255, 48)[None, :, None] * np.ones((48, 1, 3)) + rng.normal(0, 4, (48, 48, 3))
                else:
                    image = rng.integers(0, 256, (48, 48, 3)).astype(float)
                if label == "fake":
                    image[20:24, 20:24] += 12
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def command_run(dataset, tmp_path_factory):
    """The run folder ``dfd embed`` wrote, its exit status and what it printed."""
    root = tmp_path_factory.mktemp("command") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = dfd_main(["embed", "--run-dir", str(root), "--dataset", str(dataset), *EMBED_OPTIONS])
    return root, status, printed.getvalue()


@pytest.fixture(scope="module")
def notebook_run(dataset, tmp_path_factory):
    """What notebooks 01 (without its map) and 02 (without its figures) write with the same settings."""
    run = runs.open_run(tmp_path_factory.mktemp("notebook") / "run")
    manifest = prepare_run_dataset(run, DatasetSpec(dataset=str(dataset)))
    embeddings.embed_run(run, manifest.table, EmbeddingConfig(image_size=32, batch_size=8, num_workers=0, device="cpu"),
                         progress=False)
    result = embedding_store.load_run_embeddings(run)
    trainval = result.select(splits=[TRAIN, VAL])
    sweep = clusters.silhouette_sweep(trainval.embeddings, ks=range(2, 4 + 1), seed=0)
    table = resplits.build_resplits(trainval.table, trainval.embeddings, clusters.best_k(sweep), seed=0, merge_single_class=True)
    check_no_group_leakage(table)
    save_resplits(table, run.path(runs.RESPLITS))
    return run.root


def test_dfd_embed_writes_the_manifest_and_embeddings_notebook_01_writes(command_run, notebook_run):
    command_run, status, out = command_run
    assert status == 0
    assert "40 images -> " in out and "0 files skipped" in out
    assert "40 embeddings of width 1280, computed; 0 images failed" in out
    assert (command_run / runs.MANIFEST).read_bytes() == (notebook_run / runs.MANIFEST).read_bytes()
    ours, theirs = (embedding_store.load_run_embeddings(runs.RunDir(root)) for root in (command_run, notebook_run))
    assert ours.embeddings.shape == (40, 1280)
    np.testing.assert_array_equal(ours.embeddings, theirs.embeddings)
    index = [json.loads((root / runs.EMBEDDINGS_INDEX).read_text()) for root in (command_run, notebook_run)]
    assert index[0]["config"] == index[1]["config"] == {**EmbeddingConfig().to_dict(), "image_size": 32, "batch_size": 8,
                                                        "num_workers": 0, "device": "cpu"}


def test_dfd_cluster_writes_the_resplits_notebook_02_writes(command_run, notebook_run, capsys):
    command_run, status, _ = command_run
    assert status == 0
    assert dfd_main(["cluster", "--run-dir", str(command_run), "--k-max", "4"]) == 0
    out = capsys.readouterr().out
    assert "K = 2 (best silhouette) on 40 train/val images" in out
    assert "2 re-splits, no group on both sides" in out
    counts = out[out.index("fake_share"):].splitlines()[2:4]  # one row per cluster: reals, fakes, total, share
    assert [line.split() for line in counts] == [["0", "10", "10", "20", "0.5"], ["1", "10", "10", "20", "0.5"]]
    assert (command_run / runs.RESPLITS).read_bytes() == (notebook_run / runs.RESPLITS).read_bytes()


@pytest.mark.parametrize(("command", "message"), [
    (["embed", "--image-size", "4"], "dfd embed: image_size must be at least 8 pixels (or 0 for the backbone's own), got 4"),
    (["embed", "--dataset", "no/such/folder"], "dfd embed: dataset not found:"),
    (["cluster", "--k-min", "5", "--k-max", "3"], "dfd cluster: ClusterConfig.k_max must be an int >= k_min (5), got 3"),
    (["cluster", "--n-clusters", "1"], "dfd cluster: ClusterConfig.n_clusters must be 0 (the sweep's best K) or an int >= 2"),
    (["cluster"], "run step 01_features_umap first"),
])
def test_a_bad_option_or_input_stops_with_a_clear_error(command, message, tmp_path, capsys):
    assert dfd_main([command[0], "--run-dir", str(tmp_path), *command[1:]]) == 2
    assert message in capsys.readouterr().err


def test_an_option_of_the_wrong_type_or_name_is_a_usage_error(tmp_path, capsys):
    for argv, message in ((["cluster", "--run-dir", str(tmp_path), "--k-max", "ten"], "argument --k-max: invalid int value: 'ten'"),
                          (["embed", "--run-dir", str(tmp_path), "--umap-neighbors", "5"], "unrecognized arguments: --umap-neighbors")):
        with pytest.raises(SystemExit) as stop:
            dfd_main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert dfd_main(["cluster", "--run-dir", str(tmp_path / "never-made")]) == 2
    assert "no run folder" in capsys.readouterr().err and not (tmp_path / "never-made").exists()


def _options(module) -> set[str]:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return {action.dest for action in parser._actions} - {"help"}


def test_the_commands_take_every_option_of_their_configs():
    assert COMMANDS["embed"][0] == "dfd_lib.steps.features" and COMMANDS["cluster"][0] == "dfd_lib.steps.clustering"
    assert _options(features) == {"run_dir", *DatasetSpec.parameter_names(), *EmbeddingConfig.parameter_names()}
    assert _options(clustering) == {"run_dir", *ClusterConfig.parameter_names()}


@pytest.mark.slow
def test_the_cluster_command_runs_as_a_module(tmp_path):
    # as accelerate launch -m dfd_lib.steps.clustering starts it
    done = subprocess.run([sys.executable, "-m", "dfd_lib.steps.clustering", "--run-dir", str(tmp_path), "--k-min", "1"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "ClusterConfig.k_min must be an int >= 2" in done.stderr
