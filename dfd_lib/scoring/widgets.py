"""The upload widget of notebook 05 (also an app under Voilà): drop images, see each one's
fake probability, its experts' probabilities and a heatmap; a threshold slider
recolours the verdicts without rescoring. The heatmap is the localisation heads' map (where the mixture
predicts an edit, :mod:`dfd_lib.scoring.maps`) for a mixture with heads, Grad-CAM (where the experts
looked) otherwise; with heads a toggle switches between the two for the next uploads.

The work is in plain functions — :func:`handle_upload` scores a FileUpload value (a list of
``{"name", "type", "size", "content", "last_modified"}`` records, as ipywidgets 8 gives
them) — so it is tested without a browser by setting the widget's value as an upload does.
Demo weights show their notice in a banner above the widget.
"""
from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import ipywidgets as widgets
import numpy as np
from PIL import Image, ImageDraw

from dfd_lib.data.images import ImageLoadError, load_rgb
from dfd_lib.models.demo_weights import demo_notice
from dfd_lib.scoring import explain
from dfd_lib.scoring.calibration import VerdictThreshold, resolve_threshold
from dfd_lib.scoring.faces import FaceDetector, FaceScores, face_crops, score_colour, summarise_faces
from dfd_lib.scoring.maps import HEATMAP_LABELS
from dfd_lib.scoring.predictor import Prediction, Predictor

FAKE_COLOUR, REAL_COLOUR, ERROR_COLOUR = "#c62828", "#2e7d32", "#6d4c41"
THUMBNAIL_SIDE = 256


@dataclass
class UploadResult:
    """One uploaded file: its prediction (``prediction.error`` says why when unreadable) and,
    when scored, a thumbnail and the heatmap's overlay (``overlay_kind``: grad-cam or localisation)."""

    name: str
    prediction: Prediction
    thumbnail: Image.Image | None = None
    overlay: Image.Image | None = None
    faces: FaceScores | None = None  # with faces on: every face's box and score (none found: whole image)
    overlay_kind: str = ""


@dataclass
class _Card:
    result: UploadResult
    verdict: widgets.HTML
    bars: list[widgets.FloatProgress]
    box: widgets.Box


@dataclass
class UploadApp:
    """The widgets and the state behind them; display ``app.widget``."""

    predictor: Predictor
    upload: widgets.FileUpload
    threshold: widgets.FloatSlider
    status: widgets.HTML
    results_box: widgets.VBox
    widget: widgets.VBox
    explain: bool = True
    cards: list[_Card] = field(default_factory=list)
    verdicts: VerdictThreshold | None = None  # the threshold the slider starts at, and where it came from
    threshold_note: widgets.HTML = field(default_factory=widgets.HTML)  # says where the slider's value comes from
    faces: widgets.Checkbox = field(default_factory=lambda: widgets.Checkbox(False, description="score faces"))
    detector: FaceDetector = field(default_factory=FaceDetector)
    heatmap: widgets.ToggleButtons = field(default_factory=lambda: heatmap_toggle(False))  # which heatmap to draw

    @property
    def results(self) -> list[UploadResult]:
        return [card.result for card in self.cards]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def verdict_html(prediction: Prediction, threshold: float) -> str:
    if not prediction.ok:
        return f'<b style="color:{ERROR_COLOUR}">not scored</b>: {prediction.error}'
    fake = prediction.prob >= threshold
    colour, word = (FAKE_COLOUR, "FAKE") if fake else (REAL_COLOUR, "REAL")
    return (f'<span style="color:{colour};font-size:1.3em;font-weight:700">{word}</span> '
            f'<span style="font-size:1.3em">{prediction.prob:.4f}</span>'
            f'<br><small>fake probability (threshold {threshold:.4f})</small>')


def _bar_style(prob: float, threshold: float) -> str:
    return "danger" if prob >= threshold else "success"


def with_face_boxes(image: Image.Image, scores: FaceScores) -> Image.Image:
    """``image`` with each face's box drawn in its score's colour (green real, red fake)."""
    drawn = image.copy()
    pen = ImageDraw.Draw(drawn)
    width = max(2, round(max(image.size) / 200))
    for box, prob in zip(scores.boxes, scores.probs):
        pen.rectangle(box.as_list(), outline=score_colour(prob), width=width)
        pen.text((box.left + width, max(0, box.top - 12)), f"{prob:.3f}", fill=score_colour(prob))
    return drawn


def heatmap_toggle(has_maps: bool) -> widgets.ToggleButtons:
    """The choice of heatmap: the localisation heads' map first when the mixture has heads; shown only then."""
    kinds = ("localisation", "grad-cam") if has_maps else ("grad-cam",)
    return widgets.ToggleButtons(options=[(HEATMAP_LABELS[kind], kind) for kind in kinds], value=kinds[0],
                                 layout=widgets.Layout(display="" if has_maps else "none"))


def explain_upload(predictor: Predictor, name: str, source, picture: Image.Image | np.ndarray,
                   kind: str) -> tuple[Prediction, Image.Image]:
    """Score ``source`` and draw its ``kind`` heatmap (grad-cam or localisation) over ``picture``, thumbnail-sized."""
    if kind == "localisation":
        size = (picture.height, picture.width) if isinstance(picture, Image.Image) else picture.shape[:2]
        scores, localisation = predictor.localise_tensor(predictor.load_tensor(source), size)
        prediction = Prediction(name, float(scores["prob"][0]), [float(p) for p in scores["expert_probs"][0]])
        return prediction, explain.overlay_heatmap(picture, localisation, max_side=THUMBNAIL_SIDE)
    if kind != "grad-cam":
        raise ValueError(f"heatmap must be grad-cam or localisation, got {kind!r}")
    result = explain.explain(predictor, source)
    prediction = Prediction(name, result.prob, result.expert_probs)
    return prediction, explain.overlay_heatmap(picture, result.cam, max_side=THUMBNAIL_SIDE)


def score_faces_upload(predictor: Predictor, name: str, rgb: Image.Image, detector: FaceDetector,
                       with_heatmap: bool = True, heatmap: str = "grad-cam") -> UploadResult:
    """Score each face of an uploaded image (the whole image without one), as ``dfd predict --faces``."""
    crops, boxes = face_crops(np.asarray(rgb), detector)
    predictions = predictor.predict(crops)
    scores = summarise_faces([p.prob for p in predictions], [p.expert_probs for p in predictions], boxes,
                             detector.options.rule)
    thumbnail = with_face_boxes(rgb, scores)
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    overlay = None
    if with_heatmap:  # the heatmap of the face that decides
        crop = crops[scores.chosen or 0]
        overlay = explain_upload(predictor, name, crop, crop, heatmap)[1]
    return UploadResult(name, Prediction(name, scores.prob, scores.expert_probs), thumbnail, overlay, scores,
                        heatmap if with_heatmap else "")


def score_upload(predictor: Predictor, name: str, content: bytes, with_heatmap: bool = True,
                 faces: FaceDetector | None = None, heatmap: str = "grad-cam") -> UploadResult:
    """Score one uploaded file (each face with ``faces``) and draw its ``heatmap`` (grad-cam, or
    localisation for a mixture with heads); an unreadable file becomes a result with ``error`` set."""
    try:
        rgb = load_rgb(content)
    except ImageLoadError as exc:
        return UploadResult(name, Prediction(name, None, error=exc.reason))
    except Image.DecompressionBombError as exc:  # Pillow's guard fires before load_rgb's own check
        return UploadResult(name, Prediction(name, None, error=f"decompression bomb refused: {exc}"))
    if faces is not None:
        return score_faces_upload(predictor, name, rgb, faces, with_heatmap, heatmap)
    # compat mode decodes the file's bytes with OpenCV, as the original did
    source = content if predictor.preprocess == "compat" else rgb
    thumbnail = rgb.copy()
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    if with_heatmap:
        prediction, overlay = explain_upload(predictor, name, source, rgb, heatmap)
        return UploadResult(name, prediction, thumbnail, overlay, overlay_kind=heatmap)
    prediction = predictor.predict_one(source)
    prediction.source = name
    return UploadResult(name, prediction, thumbnail)


def faces_note_html(scores: FaceScores) -> str:
    if not scores.faces_found:
        return "<small>no face found: the whole image was scored</small>"
    listed = ", ".join(f"{p:.3f}" for p in scores.probs)
    return (f"<small>{scores.faces_found} face(s) found ({listed}); the score is face {scores.chosen}'s "
            f"(rule: {scores.rule})</small>")


def result_card(result: UploadResult, threshold: float, backbones: Sequence[str] = ()) -> _Card:
    """The widgets showing one result: image, heatmap, verdict and one bar per expert."""
    verdict = widgets.HTML(verdict_html(result.prediction, threshold))
    title = widgets.HTML(f"<b>{result.name}</b>")
    bars = []
    for i, prob in enumerate(result.prediction.expert_probs):
        label = f"expert {i}" + (f" ({backbones[i].split('.')[0]})" if i < len(backbones) else "")
        bars.append(widgets.FloatProgress(value=prob, min=0.0, max=1.0, description=f"{prob:.3f}",
                                          bar_style=_bar_style(prob, threshold), tooltip=label,
                                          layout=widgets.Layout(width="320px")))
    images = []
    for picture, caption in ((result.thumbnail, "image"), (result.overlay, HEATMAP_LABELS.get(result.overlay_kind, ""))):
        if picture is not None:
            images.append(widgets.VBox([widgets.Image(value=_png(picture), format="png"), widgets.HTML(f"<small>{caption}</small>")]))
    details = widgets.VBox([title, verdict, *bars, *([widgets.HTML(faces_note_html(result.faces))] if result.faces else [])])
    box = widgets.HBox([*images, details], layout=widgets.Layout(border_bottom="1px solid #ddd", padding="6px"))
    return _Card(result, verdict, bars, box)


def threshold_note_html(verdicts: VerdictThreshold | None, value: float) -> str:
    """Where the slider's threshold comes from: the mixture's calibration, a given value, 0.5 (not
    calibrated), or the slider moved away from it."""
    if verdicts is None:
        return ""
    if abs(value - verdicts.value) > 1e-4:
        return f"<small>moved here; the mixture's threshold is {verdicts.value:.4f} ({verdicts.source})</small>"
    return f"<small>{verdicts.note}</small>"


def notice_html(notice: str) -> str:
    """A banner for demo weights' notice (:mod:`dfd_lib.models.demo_weights`)."""
    return (f'<div style="background:#fff3e0;border:2px solid #e65100;border-radius:6px;padding:6px 10px;'
            f'color:#bf360c;font-weight:600">{html.escape(notice)}</div>')


def recolour(app: UploadApp) -> None:
    """Redraw every verdict and bar at the slider's threshold (no rescoring)."""
    threshold = app.threshold.value
    app.threshold_note.value = threshold_note_html(app.verdicts, threshold)
    for card in app.cards:
        card.verdict.value = verdict_html(card.result.prediction, threshold)
        for bar in card.bars:
            bar.bar_style = _bar_style(bar.value, threshold)


def _file_records(value) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` from a FileUpload value: ipywidgets 8 gives a tuple of records,
    ipywidgets 7 a dict name -> record."""
    records = value.values() if isinstance(value, Mapping) else value
    out = []
    for record in records:
        content = record["content"]
        out.append((str(record.get("name", "upload")), content.tobytes() if isinstance(content, memoryview) else bytes(content)))
    return out


def handle_upload(app: UploadApp, value) -> list[UploadResult]:
    """Score the files of a FileUpload ``value`` and show them (newest first)."""
    files = _file_records(value)
    if not files:
        return []
    app.status.value = f"scoring {len(files)} image(s)…"
    new_cards = []
    for name, content in files:
        result = score_upload(app.predictor, name, content, with_heatmap=app.explain,
                              faces=app.detector if app.faces.value else None, heatmap=app.heatmap.value)
        new_cards.append(result_card(result, app.threshold.value, app.predictor.config.backbones))
    app.cards[:0] = new_cards
    app.results_box.children = tuple(card.box for card in app.cards)
    failed = sum(not card.result.prediction.ok for card in new_cards)
    app.status.value = f"scored {len(files) - failed} of {len(files)} image(s)" + (f"; {failed} unreadable" if failed else "")
    return [card.result for card in new_cards]


def build_upload_app(predictor: Predictor, threshold: float | VerdictThreshold | None = None,
                     with_heatmap: bool = True, faces: bool = False) -> UploadApp:
    """The upload widget wired to ``predictor``; display ``app.widget``. The slider starts at
    ``threshold``: by default the mixture's calibrated one (0.5 when it was not calibrated)."""
    verdicts = threshold if isinstance(threshold, VerdictThreshold) else resolve_threshold(predictor.config, threshold)
    upload = widgets.FileUpload(accept="image/*", multiple=True, description="Upload images")
    slider = widgets.FloatSlider(value=verdicts.value, min=0.0, max=1.0, step=0.0001, description="threshold",
                                 continuous_update=True, readout_format=".4f")
    status = widgets.HTML("drop or choose images to score")
    results_box = widgets.VBox()
    experts = ", ".join(dict.fromkeys(predictor.config.backbones))
    sizes = " / ".join(str(size) for size in dict.fromkeys(predictor.config.expert_sizes))  # experts may differ (a ViT's own)
    header = widgets.HTML(f"<b>{predictor.num_experts} experts</b> ({experts}) at {sizes} px")
    notice = demo_notice(predictor.config)
    banner = [widgets.HTML(notice_html(notice))] if notice else []
    note = widgets.HTML(threshold_note_html(verdicts, slider.value))
    faces_box = widgets.Checkbox(faces, description="score faces", tooltip="crop each face found (1.3x its box) and score it")
    heatmap = heatmap_toggle(predictor.has_maps)
    body = widgets.VBox([*banner, header, widgets.HBox([upload, slider, faces_box]), heatmap, note, status, results_box])
    app = UploadApp(predictor, upload, slider, status, results_box, body, with_heatmap,
                    verdicts=verdicts, threshold_note=note, faces=faces_box, heatmap=heatmap)
    upload.observe(lambda change: handle_upload(app, change["new"]), names="value")
    slider.observe(lambda _change: recolour(app), names="value")
    return app
