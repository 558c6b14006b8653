"""Each image scored once per expert in a process: the scoring behind notebook 04's evaluation
(the headline table, the calibration, the loss ablation, the ladder, the robustness table).

An expert is known by a digest of its tensors (:func:`state_digest`), whether it comes from its own
weights file (``best_ema.safetensors``) or from a mixture folder (``weights/moe``), so the mixture's
expert *i* and the file of expert *i* are one expert. An input is known by a digest of its
preprocessed tensor: the pixels the model sees, whatever file, array or PIL image they came from.
A fake-probability computed once for an (expert, input) pair is kept in memory (:class:`ScoreCache`,
one per process, :data:`SHARED`) and reused by every later table that needs it: a reused score
provably comes from the same weights and the same input. Nothing here is written to disk but the
OpenVINO exports of :mod:`dfd_lib.scoring.expert_runners`, keyed by the same tensor digest.

The forward pass runs on the fastest exact engine (:mod:`dfd_lib.scoring.expert_runners`): OpenVINO
when it is installed and the expert has enough images to pay for its conversion (or its export is
cached), else torch with the batch norms folded and channels_last, both at torch's thread count (a
profile's ``threads``; torch's default is every core). Both stay within 1e-5
of the plain torch expert. ``DFD_EVAL_BACKEND=torch`` (or ``openvino``) forces one. Where torch's threads
leave cores free (``threads: 1`` on a 2-core CPU), several torch experts forward at the same time
(:func:`experts_at_once`), each on the same batches as alone, and OpenVINO takes those cores in its own
threads (:func:`openvino_threads`): the same scores, in less time.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from dfd_lib.core.cpus import available_cores
from dfd_lib.core.logs import progress_bar
from dfd_lib.data.images import ImageLoadError, ImageSource
from dfd_lib.data.preprocess import InputTransform
from dfd_lib.models.checkpoints import MixtureConfig, load_expert, load_mixture
from dfd_lib.models.experts import Expert
from dfd_lib.scoring.expert_runners import OpenVINORunner, TorchRunner, has_export, openvino_installed
from dfd_lib.scoring.file_crops import decode_rgb

BACKEND_ENV = "DFD_EVAL_BACKEND"
ENGINES = ("auto", "torch", "openvino")
AT_ONCE_ENV = "DFD_EVAL_EXPERTS_AT_ONCE"
CONVERT_MIN_IMAGES = 1000  # below this many images to score, converting an expert costs more than it saves


def state_digest(backbone: str, state: dict[str, torch.Tensor]) -> str:
    """sha256 of an expert's architecture and tensors (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256(backbone.encode())
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocessing:
    """What turns an image into an expert's input (:class:`~dfd_lib.data.preprocess.InputTransform`)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    antialias: bool = True
    decode: str = "default"  # the Predictor's preprocess mode: default (Pillow) or compat (OpenCV)

    def transform(self) -> InputTransform:
        return InputTransform(self.image_size, self.mean, self.std, self.interpolation, self.antialias)


@dataclass(frozen=True)
class ExpertWeights:
    """One expert: its tensor digest, its backbone, and how to build it when a forward pass is needed."""

    digest: str
    backbone: str
    load: Callable[[], Expert] = field(compare=False, repr=False)


@functools.lru_cache(maxsize=256)
def _file_expert(path: Path, size: int, mtime_ns: int) -> tuple[ExpertWeights, dict]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = json.loads(handle.metadata()["dfd_expert"])
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    expert = ExpertWeights(state_digest(meta["backbone"], state), meta["backbone"],
                           functools.partial(lambda p: load_expert(p)[0], path))
    return expert, meta


def expert_from_file(path: str | os.PathLike) -> tuple[ExpertWeights, Preprocessing]:
    """An expert's weights file (``best_ema.safetensors``) and the preprocessing it was trained with."""
    path = Path(path).resolve()
    stat = path.stat()
    expert, meta = _file_expert(path, stat.st_size, stat.st_mtime_ns)
    return expert, Preprocessing(int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]),
                                 meta.get("interpolation", "bilinear"))


def experts_from_mixture(weights_dir: str | os.PathLike) -> tuple[list[ExpertWeights], list[Preprocessing]]:
    """The experts of a mixture folder (ours: ``model.safetensors`` + ``config.json``) and each one's preprocessing
    (the same for all but in a mixture whose experts differ: ``MixtureConfig.expert_inputs``)."""
    model, config = load_mixture(weights_dir)
    experts = [ExpertWeights(state_digest(e.backbone_name, e.state_dict()), e.backbone_name,
                             functools.partial(lambda e: e, e)) for e in model.experts]
    return experts, mixture_preprocessing(config)


def mixture_preprocessing(config: MixtureConfig, decode: str = "default") -> list[Preprocessing]:
    """Each expert's preprocessing in a mixture's config."""
    shared = {"image_size": config.image_size, "mean": config.mean, "std": config.std, "interpolation": config.interpolation}
    return [Preprocessing(int(e["image_size"]), tuple(e["mean"]), tuple(e["std"]), e["interpolation"], config.antialias, decode)
            for e in config.expert_inputs or [shared] * len(config.backbones)]


class ScoreCache:
    """Fake-probabilities by expert digest and input digest, kept for the process (a few floats an image)."""

    def __init__(self):
        self.scores: dict[str, dict[bytes, float]] = {}
        self.computed: Counter[str] = Counter()  # expert digest -> (expert, input) pairs computed, never reused

    def lookup(self, expert: str, inputs: Sequence[bytes]) -> np.ndarray:
        known = self.scores.get(expert, {})
        return np.array([known.get(key, np.nan) for key in inputs], dtype=np.float64)

    def store(self, expert: str, inputs: Sequence[bytes], probs: np.ndarray) -> None:
        self.scores.setdefault(expert, {}).update(zip(inputs, (float(p) for p in probs)))
        self.computed[expert] += len(inputs)

    def clear(self) -> None:
        self.scores.clear()
        self.computed.clear()


SHARED = ScoreCache()


def input_digest(tensor: torch.Tensor) -> bytes:
    """A digest of a preprocessed input: its shape and float32 bytes."""
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    return hashlib.blake2b(str(tuple(data.shape)).encode() + data.numpy().tobytes(), digest_size=16).digest()


def prepare_inputs(sources: Sequence[ImageSource], preprocessing: Preprocessing) -> tuple[list, list[torch.Tensor]]:
    """Each source decoded and preprocessed once: its input digest (None when unreadable) and the tensors read."""
    transform = preprocessing.transform()
    keys, tensors = [], []
    for source in sources:
        try:
            tensor = transform(decode_rgb(source, preprocessing.decode))
        except ImageLoadError:
            keys.append(None)
            continue
        keys.append(input_digest(tensor))
        tensors.append(tensor)
    return keys, tensors


def choose_engine(expert: ExpertWeights, missing: int, image_size: int, engine: str | None = None) -> str:
    """torch or openvino for ``missing`` images of ``expert`` (see the module's docstring)."""
    engine = engine or os.environ.get(BACKEND_ENV, "auto")
    if engine not in ENGINES:
        raise ValueError(f"{BACKEND_ENV} / engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    if not openvino_installed():
        return "torch"
    return "openvino" if missing >= CONVERT_MIN_IMAGES or has_export(expert.digest, image_size) else "torch"


_RUNNERS: OrderedDict[tuple, object] = OrderedDict()  # the engines built last, reused by later calls
RUNNERS_KEPT = 16  # notebook 04's models on the demo: 8 experts, the official-split model, 3 + 2 more
CHUNK_BYTES = 256 << 20  # preprocessed inputs held at once


def runner_for(expert: ExpertWeights, engine: str, image_size: int):
    """The expert ready to forward on ``engine`` at torch's thread count, built once and kept for the next
    calls (robustness scores a batch per call)."""
    threads = openvino_threads() if engine == "openvino" else torch.get_num_threads()  # (a profile's ``threads``)
    key = (expert.digest, engine, image_size, threads)
    if key not in _RUNNERS:
        _RUNNERS[key] = (OpenVINORunner(expert.load(), expert.digest, image_size, threads) if engine == "openvino"
                         else TorchRunner(expert.load()))
        while len(_RUNNERS) > RUNNERS_KEPT:
            _RUNNERS.popitem(last=False)
    _RUNNERS.move_to_end(key)
    return _RUNNERS[key]


def score_images(experts: Sequence[ExpertWeights], preprocessing: Preprocessing, sources: Sequence[ImageSource],
                 batch_size: int = 64, cache: ScoreCache | None = None, engine: str | None = None,
                 progress: bool = False) -> np.ndarray:
    """``(len(sources), len(experts))`` fake-probabilities, NaN for an unreadable source: each source
    decoded once, each (expert, input) pair forwarded only when ``cache`` (default :data:`SHARED`) lacks it."""
    cache = SHARED if cache is None else cache
    sources = list(sources)
    probs = np.full((len(sources), len(experts)), np.nan)
    chunk = max(batch_size, CHUNK_BYTES // (12 * preprocessing.image_size**2))
    engines = [choose_engine(e, len(sources), preprocessing.image_size, engine) for e in experts]
    bar = progress_bar(total=len(sources), desc="scoring", unit="img", disable=not progress)
    for start in range(0, len(sources), chunk):
        keys, tensors = prepare_inputs(sources[start : start + chunk], preprocessing)
        first: dict[bytes, int] = {}  # input digest -> its tensor (an input given twice is one input)
        for i, key in enumerate(k for k in keys if k is not None):
            first.setdefault(key, i)
        batches: dict[tuple, list[torch.Tensor]] = {}  # the missing inputs -> their batches, stacked once for all experts
        work = []  # (expert, its missing inputs, its runner)
        for expert, chosen in zip(experts, engines):
            todo = tuple(k for k, v in zip(first, cache.lookup(expert.digest, list(first))) if np.isnan(v))
            if todo:
                if todo not in batches:
                    batches[todo] = [torch.stack([tensors[first[k]] for k in todo[s : s + batch_size]])
                                     for s in range(0, len(todo), batch_size)]
                work.append((expert, todo, runner_for(expert, chosen, preprocessing.image_size)))
        for (expert, todo, _), found in zip(work, _forward(work, batches)):
            cache.store(expert.digest, todo, found)
        for j, expert in enumerate(experts):
            found = dict(zip(first, cache.lookup(expert.digest, list(first))))
            probs[start : start + len(keys), j] = [found[k] if k is not None else np.nan for k in keys]
        bar.update(len(keys))
    bar.close()
    return probs


def experts_at_once(count: int) -> int:
    """How many torch experts forward at the same time: as many as the cores hold at torch's thread count (a
    profile's ``threads: 1`` on 2 cores: 2), at most ``count``; ``DFD_EVAL_EXPERTS_AT_ONCE`` sets it."""
    chosen = os.environ.get(AT_ONCE_ENV, "")
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"{AT_ONCE_ENV} must be an int >= 1, got {chosen!r}")
        return max(1, min(count, int(chosen)))
    return max(1, min(count, available_cores() // max(1, torch.get_num_threads())))


def openvino_threads() -> int:
    """OpenVINO's threads for one expert: the threads torch's experts use together (:func:`experts_at_once`). Its
    CPU plugin runs one compiled model at a time in a process, so it takes the cores in its own threads instead."""
    return torch.get_num_threads() * experts_at_once(available_cores())


def _forward(work: list[tuple], batches: dict[tuple, list[torch.Tensor]]) -> list[np.ndarray]:
    """Each (expert, inputs, runner) of ``work`` forwarded on its inputs' batches: the torch experts several at once
    in threads (torch releases the GIL while it computes; each expert's batches are those it would get alone, so
    its scores do not depend on the others), the OpenVINO ones in turn on :func:`openvino_threads`."""
    def run(item: tuple) -> np.ndarray:
        _, todo, runner = item
        return np.concatenate([runner(batch) for batch in batches[todo]])

    together = [i for i, item in enumerate(work) if item[2].backend == "torch"]
    at_once = experts_at_once(len(together))
    found: dict[int, np.ndarray] = {}
    if at_once > 1:
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="dfd-expert") as pool:
            found.update(zip(together, pool.map(run, [work[i] for i in together])))
    return [found[i] if i in found else run(item) for i, item in enumerate(work)]


def score_grouped(experts: Sequence[ExpertWeights], preprocessings: Sequence[Preprocessing], sources: Sequence[ImageSource],
                  batch_size: int = 64, cache: ScoreCache | None = None, engine: str | None = None,
                  progress: bool = False) -> np.ndarray:
    """:func:`score_images` for experts each with its own preprocessing: those that share one run together."""
    groups: dict[Preprocessing, list[int]] = {}
    for i, preprocessing in enumerate(preprocessings):
        groups.setdefault(preprocessing, []).append(i)
    sources = list(sources)
    probs = np.full((len(sources), len(experts)), np.nan)
    for preprocessing, indices in groups.items():
        probs[:, indices] = score_images([experts[i] for i in indices], preprocessing, sources, batch_size, cache, engine, progress)
    return probs


def mixture_scores(weights_dir: str | os.PathLike, sources: Sequence[ImageSource], batch_size: int = 64,
                   cache: ScoreCache | None = None, engine: str | None = None, progress: bool = False) -> np.ndarray:
    """The fake-probability of the mixture in ``weights_dir`` (the mean of its experts') per source, NaN when unreadable."""
    experts, preprocessings = experts_from_mixture(weights_dir)
    return score_grouped(experts, preprocessings, sources, batch_size, cache, engine, progress).mean(axis=1)
