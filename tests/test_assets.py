"""The bundled assets' cache: built once however many processes start on an empty one."""

from __future__ import annotations

import io
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lowbit.data import assets

pytest.importorskip("fcntl")


def test_builders_on_an_empty_cache_build_an_asset_once(tmp_path, monkeypatch):
    """Four builders at once (threads here; flock locks each open file apart, as it does separate processes such
    as pytest-xdist workers or torchrun ranks): one fetches and builds, the others wait and return its result."""
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))
    fetched, built = [], []

    def download(pkg: assets.Package, dest: Path) -> Path:
        fetched.append(pkg.name)
        time.sleep(0.2)  # long enough that every builder has looked at the empty cache before one is done
        archive = dest / "pkg.tgz"
        with tarfile.open(archive, "w:gz") as tar:
            data = b"some text"
            info = tarfile.TarInfo("package/a.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return archive

    def files(tar: tarfile.TarFile) -> dict[str, str]:
        built.append(1)
        return {"a.txt": tar.extractfile("package/a.txt").read().decode()}

    monkeypatch.setattr(assets, "_download", download)
    final = tmp_path / "corpora" / "texts"
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: assets._text_corpus(final, assets.SOTU, files, "texts"), range(4)))
    assert fetched == [assets.SOTU.name] and built == [1]
    assert outs == [final] * 4 and (final / "a.txt").read_text() == "some text"
    assert (final / "PROVENANCE.json").exists()
