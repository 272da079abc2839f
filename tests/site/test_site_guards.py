"""Hostile but fair runs for the site (issue 11 item 10): hard links and files swapped after the check are not
published, no page holds the run's absolute path, and the unit query runs in the run directory."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture()
def small_run(tmp_path) -> str:
    from pipeline.bench.site import synthesize_run

    run = str(tmp_path / "run")
    synthesize_run(run, layer_sizes=(3,), k=2)
    return run


def _site_files(site: str) -> dict[str, bytes]:
    found = {}
    for directory, _, names in os.walk(site):
        for name in names:
            with open(os.path.join(directory, name), "rb") as handle:
                found[os.path.relpath(os.path.join(directory, name), site)] = handle.read()
    return found


def test_a_hard_link_to_a_file_outside_the_run_is_not_published(small_run, tmp_path, caplog):
    from pipeline.site import build_site

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-KEY-MATERIAL")
    linked = "atlas/layer=block0.conv/unit=0/crop_000.png"
    os.unlink(os.path.join(small_run, linked))
    os.link(secret, os.path.join(small_run, linked))
    with caplog.at_level("WARNING"):
        inside = _site_files(os.path.dirname(build_site(small_run, progress=False).index))
        outside = _site_files(
            os.path.dirname(build_site(small_run, out=str(tmp_path / "export"), progress=False).index)
        )
    assert "hard link" in caplog.text
    for files in (inside, outside):
        assert not any(b"SECRET-KEY-MATERIAL" in data for data in files.values())
        pages = b"\n".join(data for name, data in files.items() if name.endswith(".html"))
        assert b"unit=0/crop_000.png" not in pages
        # The rule refuses only what it must: the run's other (single-link) images are published.
        assert b"unit=0/overlay_000.png" in pages
    assert "files/atlas/layer=block0.conv/unit=0/overlay_000.png" in outside


def _swap(run: str, path: str, secret: str, how: str) -> None:
    """Replace the run's file `path` (atomically, by rename) with `how` the file `secret` outside the run."""
    staged = os.path.join(run, path + ".new")
    if how == "hard link":
        os.link(secret, staged)
    elif how == "symlink":
        os.symlink(secret, staged)
    elif how == "fifo":  # opening it for reading would block until a writer came
        os.mkfifo(staged)
    else:  # another single-link regular file with the secret's bytes: only its inode tells it apart
        shutil.copyfile(secret, staged)
    os.replace(staged, os.path.join(run, path))


SWAPS = ("hard link", "symlink", "fifo", "other file")


@pytest.mark.parametrize("how", SWAPS)
def test_a_file_swapped_after_the_check_is_not_opened(small_run, tmp_path, how):
    from pipeline.render.files import unit_file
    from pipeline.site.paths import RunFiles, UnsafePathError

    files = RunFiles(small_run)
    # The name from its one home (render writes featvis.png; a literal featvis_000.png named no file).
    path = unit_file("block0.conv", 1, "featvis")
    assert files.exists(path)
    with files.open(path) as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET")
    _swap(small_run, path, str(secret), how)
    with pytest.raises(UnsafePathError, match="changed since it was checked"):
        files.open(path)


@pytest.mark.parametrize("how", SWAPS)
def test_a_file_swapped_after_the_pages_is_not_copied(small_run, tmp_path, monkeypatch, caplog, how):
    """End to end: the pages are made (every file checked), then a file is swapped before the images are
    copied into a site outside the run; the build finishes, warns, and the site holds no byte of the secret."""
    from pipeline.render.files import unit_file
    from pipeline.site import build as site_build

    path = unit_file("block0.conv", 1, "featvis")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-KEY-MATERIAL")
    media = site_build._Pages.media

    def swap_then_copy(pages) -> None:
        assert path in pages.used_media  # the page links it: it would be copied but for the re-check
        _swap(small_run, path, str(secret), how)
        media(pages)

    monkeypatch.setattr(site_build._Pages, "media", swap_then_copy)
    with caplog.at_level("WARNING"):
        site = os.path.dirname(site_build.build_site(small_run, out=str(tmp_path / "export"), progress=False).index)
    assert "not copied" in caplog.text and path in caplog.text
    files = _site_files(site)
    assert not any(b"SECRET-KEY-MATERIAL" in data for data in files.values())
    assert f"files/{path}" not in files
    # Only the swapped file is left out: its neighbours are copied.
    assert f"files/{unit_file('block0.conv', 1, 'crop', 0)}" in files


def test_no_page_holds_the_runs_absolute_path(small_run, tmp_path):
    from pipeline.site import build_site

    for out in (None, str(tmp_path / "export")):
        site = os.path.dirname(build_site(small_run, out=out, progress=False).index)
        for name, data in _site_files(site).items():
            for path in {small_run, os.path.realpath(small_run)}:
                assert path.encode() not in data, name
    unit_page = _site_files(site)["units/" + sorted(os.listdir(os.path.join(site, "units")))[0] + "/0.html"]
    assert b"read_parquet(&#39;topk/*/*.parquet&#39;" in unit_page


def test_the_unit_query_runs_in_the_run_directory(small_run, monkeypatch):
    import duckdb

    from pipeline.site.build import unit_query

    monkeypatch.chdir(small_run)
    rows = duckdb.sql(unit_query("block0.conv", 1)).fetchall()
    assert [r[0] for r in rows] == [0, 1]
