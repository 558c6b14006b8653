"""The enrichment's work list: for each family, which source (and donor) each new image uses and
the seed that fixes it, drawn deterministically from the config and the source table."""
from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dfd_lib.data.manifest import FAKE, REAL
from dfd_lib.synth import factory
from dfd_lib.synth.config import EnrichmentConfig
from dfd_lib.synth.kinds import text_or_none

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One image to make."""

    id: str
    family: str
    seed: int
    source: dict  # the source manifest row
    donor_path: str | None = None
    fingerprint: str = ""  # what decides the image: a resumed run reuses a file only if this matches


def family_seed(seed: int, family: str, index: int) -> int:
    """A per-image seed (index -1: the family's planning seed), independent of which other
    families run, so ids and images stay stable when the family list changes."""
    return int(np.random.SeedSequence([seed, zlib.crc32(family.encode()), index + 1]).generate_state(1)[0])


def source_pool(table: pd.DataFrame, config: EnrichmentConfig) -> pd.DataFrame:
    """The rows sources are drawn from: those of ``config.source_splits`` (every row when empty)."""
    if not config.source_splits:
        return table.reset_index(drop=True)
    if "split" not in table.columns:
        raise ValueError("source_splits is set but the source table has no 'split' column")
    return table[table["split"].isin(config.source_splits)].reset_index(drop=True)


def plan_jobs(table: pd.DataFrame, config: EnrichmentConfig) -> list[Job]:
    """The deterministic work list: for each family, which source (and donor) each image uses."""
    pool = source_pool(table, config)
    reals = pool[pool["label"] == REAL]
    fakes = pool[pool["label"] == FAKE]
    jobs: list[Job] = []
    for name in config.families:
        family = factory.get_family(name)
        rng = np.random.default_rng(family_seed(config.seed, name, -1))
        n = config.images_per_family
        if family.keeps_label and config.degrade_fake_fraction > 0 and len(fakes):
            n_fake = int(round(n * config.degrade_fake_fraction))
            picks = _pick(fakes, n_fake, rng) + _pick(reals, n - n_fake, rng)
        else:
            picks = _pick(reals, n, rng)
        if n and not picks:
            log.warning("augment: no source images for family %r; skipped", name)
        for index, row in enumerate(picks):
            out_family = family.output_name(int(row["label"]))
            job = Job(f"{out_family}-s{config.seed}-{index:05d}", out_family, family_seed(config.seed, name, index), row)
            if family.needs_donor:
                # donors come from the same split: no content crosses a split boundary
                same_split = reals[reals["split"].astype(str) == str(row.get("split"))] if "split" in reals else reals
                donors = same_split if len(same_split) else reals
                job.donor_path = str(donors.iloc[int(rng.integers(len(donors)))]["path"])
            job.fingerprint = fingerprint(job, config)
            jobs.append(job)
    return jobs


def fingerprint(job: Job, config: EnrichmentConfig) -> str:
    """A digest of everything that decides ``job``'s image: its source (path and content hash),
    donor, seed and what its kind adds (for Stable Diffusion the checkpoint, settings and mask)."""
    family = factory.get_family(job.family)
    key: dict = {"family": job.family, "parent": str(job.source.get("path")), "parent_hash": text_or_none(job.source.get("hash")),
                 "seed": job.seed, "donor": job.donor_path}
    key.update(factory.kind_of(family).cache_key(family, config, job.source))
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pick(candidates: pd.DataFrame, n: int, rng: np.random.Generator) -> list[dict]:
    if n <= 0 or not len(candidates):
        return []
    order = rng.choice(len(candidates), size=n, replace=n > len(candidates))
    return [candidates.iloc[int(i)].to_dict() for i in order]
