"""Settings of different steps that must agree, checked before anything runs (``dfd check``, and the
preflight of ``dfd pipeline``).

The number of re-splits K comes from step 02 (``n_clusters``, or the best silhouette score between
``k_min`` and ``k_max``; merging single-class clusters can lower it to 2) and is known only once 02 ran,
so these checks bound it: what can never work is a problem, what depends on the data is a note.

- **Backbones against K.** Expert *i* trains backbone ``backbones[i % len(backbones)]``: fewer
  backbones than experts are cycled. More backbones than experts is an error, never a silently
  dropped backbone (here when it can never fit, at training time when K turned out too small).
- ``backbone_weights`` and ``tunings`` each hold none, one (for every backbone) or one per backbone.
- The loss ablation and the component ladder repeat the expert of ``ablation_resplit``: it must be one
  of the experts that train.
"""
from __future__ import annotations

from dataclasses import dataclass

from dfd_lib.core import runs


@dataclass(frozen=True)
class ExpertCount:
    """The fewest and the most experts notebook 04 can train with these settings."""

    low: int
    high: int
    why: str


def expert_count(clusters: dict, train: dict) -> ExpertCount:
    """Bounds on K from step 02's values, capped by 04's ``max_experts``."""
    merging = bool(clusters.get("merge_single_class", True))
    if int(clusters.get("n_clusters", 0)) > 0:
        high = int(clusters["n_clusters"])
        why = f"02.n_clusters={high}"
    else:
        high = int(clusters.get("k_max", 10))
        why = f"K chosen between 02.k_min={clusters.get('k_min', 2)} and 02.k_max={high}"
    low = 2 if merging else (high if int(clusters.get("n_clusters", 0)) > 0 else int(clusters.get("k_min", 2)))
    if merging:
        why += ", possibly fewer after merging single-class clusters (02.merge_single_class)"
    cap = int(train.get("max_experts", 0))
    if cap:
        low, high, why = min(low, cap), min(high, cap), f"{why}, at most 04.max_experts={cap}"
    return ExpertCount(low, high, why)


def cross_step_checks(values: dict[str, dict]) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` for the steps of ``values`` (step -> resolved parameters); nothing when
    steps 02 and 04 are not both there."""
    clusters, train = values.get(runs.CLUSTERS.name), values.get(runs.TRAIN.name)
    if clusters is None or train is None:
        return [], []
    count = expert_count(clusters, train)
    problems, notes = [], []
    backbones = list(train.get("backbones") or [])
    if len(backbones) > count.high:
        problems.append(f"04.backbones lists {len(backbones)} backbones but at most {count.high} experts train ({count.why}): "
                        f"{', '.join(backbones[count.high:])} would never train; give at most {count.high} backbones or more clusters")
    elif len(backbones) > count.low:
        notes.append(f"04.backbones: {len(backbones)} backbones need {len(backbones)} re-splits ({count.why}); "
                     f"with fewer, 04 stops and says which backbones would not train")
    for name, what in (("backbone_weights", "files"), ("tunings", "tunings")):
        values = train.get(name) or []
        values = [values] if isinstance(values, str) else list(values)
        if len(values) not in (0, 1, len(backbones)):
            problems.append(f"04.{name} lists {len(values)} {what} for {len(backbones)} backbones: "
                            "give none, one, or one per backbone")
    resplit = int(train.get("ablation_resplit", 0))
    if train.get("run_ablation", True) or int(train.get("ladder_seeds", 1)) > 0:
        if resplit >= count.high:
            problems.append(f"04.ablation_resplit={resplit} names no expert: at most {count.high} experts train ({count.why})")
        elif resplit >= count.low:
            notes.append(f"04.ablation_resplit={resplit} needs at least {resplit + 1} re-splits ({count.why})")
    return problems, notes
