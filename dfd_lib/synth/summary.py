"""What notebook 03 shows of its new images: counts per family and per re-split side, and a grid of
sources beside their edits and generations."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from dfd_lib.core.figures import save_figure
from dfd_lib.data.images import try_load_rgb
from dfd_lib.data.manifest import CLASS_NAMES, TRAIN, VAL
from dfd_lib.data.resplit_table import resplit_columns
from dfd_lib.synth import factory
from dfd_lib.synth.kinds import ModelKind


def family_counts(rows: pd.DataFrame, failures: pd.DataFrame | None = None, settings: Any = None) -> pd.DataFrame:
    """Per new family: its kind and label (from the registry; for a family no longer registered, from its
    rows), images written, images that failed, and a ``note`` on the model that made them under
    ``settings`` (the step's EnrichmentConfig or its values; e.g. a random-weight pipeline)."""
    counts = rows.groupby("family").agg(label=("label", "first"), images=("path", "size"))
    counts["label"] = counts["label"].map(CLASS_NAMES)
    failed = failures["family"].value_counts() if failures is not None and len(failures) else pd.Series(dtype=int)
    counts = counts.reindex(counts.index.union(failed.index))
    declared = [_declared(name) for name in counts.index]
    counts.insert(0, "kind", [kind for kind, _label in declared])
    counts["label"] = [seen if label is None else CLASS_NAMES[label] for (_kind, label), seen in zip(declared, counts["label"])]
    counts["images"] = counts["images"].fillna(0).astype(int)
    counts["failed"] = failed.reindex(counts.index).fillna(0).astype(int)
    counts["note"] = [_weights_note(name, settings) for name in counts.index]
    return counts


def _weights_note(name: str, settings: Any) -> str:
    """The registered kind's note on the model that made ``name``'s images; "" without ``settings``."""
    if settings is None:
        return ""
    try:
        family = factory.get_family(name)
    except ValueError:
        return ""
    kind = factory.kind_of(family)
    values = settings if isinstance(settings, Mapping) else vars(settings)
    return kind.weights_note(family, values) if isinstance(kind, ModelKind) else ""


def _declared(name: str) -> tuple[str, int | None]:
    """``(kind, label)`` of the output family ``name`` as registered; ``("", None)`` if it is not."""
    try:
        family = factory.get_family(name)
    except ValueError:
        return "", None
    return family.kind, family.label_of(name)


def resplit_side_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images on each side of every re-split, by class: one row per ``resplit_<i>``."""
    label = table["label"].map(CLASS_NAMES)
    out = {}
    for column in resplit_columns(table):
        out[column] = {f"{side}_{cls}": int(((table[column] == side) & (label == cls)).sum())
                       for side in (TRAIN, VAL) for cls in CLASS_NAMES.values()}
    return pd.DataFrame.from_dict(out, orient="index")


def plot_enrichment_grid(rows: pd.DataFrame, path: str | os.PathLike | None = None, per_family: int = 2):
    """One row per family, named with its kind and label: ``per_family`` examples, each as source |
    augmented image | absolute difference (bright = changed). Saved to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt  # deferred: pyplot is slow to import

    families = sorted(rows["family"].unique()) if len(rows) else []
    if not families:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no augmented images", ha="center", va="center")
    else:
        fig, axes = plt.subplots(len(families), 3 * per_family, figsize=(1.9 * 3 * per_family, 2.0 * len(families)),
                                 squeeze=False)
        for r, family in enumerate(families):
            examples = rows[rows["family"] == family].head(per_family)
            for e in range(per_family):
                cells = axes[r, 3 * e:3 * e + 3]
                for ax in cells:
                    ax.set_xticks([])
                    ax.set_yticks([])
                if e >= len(examples):
                    for ax in cells:
                        ax.axis("off")
                    continue
                row = examples.iloc[e]
                source, _ = try_load_rgb(row["parent"])
                made, _ = try_load_rgb(row["path"])
                for ax, image, title in ((cells[0], source, "source"), (cells[1], made, "augmented")):
                    if image is None:
                        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
                    else:
                        ax.imshow(image)
                    if r == 0:
                        ax.set_title(title, fontsize=9)
                if source is not None and made is not None and source.size == made.size:
                    diff = np.abs(np.asarray(made, np.int16) - np.asarray(source, np.int16)).max(axis=-1)
                    cells[2].imshow(diff, cmap="magma", vmin=0, vmax=255)
                if r == 0:
                    cells[2].set_title("|difference|", fontsize=9)
            kind, label = _declared(family)
            label = CLASS_NAMES[int(examples["label"].iloc[0]) if label is None else label]
            axes[r, 0].set_ylabel(f"{family}\n({kind + ', ' if kind else ''}{label})", fontsize=9)
        fig.tight_layout()
    save_figure(fig, path)
    return fig
