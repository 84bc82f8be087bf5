"""Corrupt data and checkpoints are refused, naming the file (issue 15 items 3-5)."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from crosscheck import cifar10, cli
from crosscheck.cifar10 import DataError


@pytest.fixture(scope="module")
def archive_bytes(cifar_dir) -> bytes:
    return (cifar_dir / cifar10.ARCHIVE).read_bytes()


def test_a_flipped_byte_in_the_archive_is_refused(archive_bytes, tmp_path, capsys):
    # Was: 133 of 161 random flips loaded (changed pixels, exit 0): tarfile never reads the gzip CRC.
    # Now all 161 are refused (/tmp/flip_probe.py in the report); here 6 of them, inside the data.
    rng = random.Random(0)
    for _ in range(6):
        position = rng.randrange(1000, len(archive_bytes) - 8)
        flipped = bytearray(archive_bytes)
        flipped[position] ^= 1 << rng.randrange(8)
        (tmp_path / cifar10.ARCHIVE).write_bytes(bytes(flipped))
        with pytest.raises(DataError, match=rf"{cifar10.ARCHIVE}: truncated or corrupt archive"):
            cifar10.load(tmp_path)
    assert cli.main(["--out", str(tmp_path / "r"), "cifar10", "--data-dir", str(tmp_path), "--max-steps", "1"]) == 2
    assert "corrupt archive" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_official_size_needs_the_official_md5(archive_bytes, tmp_path, monkeypatch):
    (tmp_path / cifar10.ARCHIVE).write_bytes(archive_bytes)
    monkeypatch.setattr(cifar10, "ARCHIVE_SIZE", len(archive_bytes))  # the subset, posing as the official file
    with pytest.raises(DataError, match=rf"md5 \w+, the official archive has {cifar10.ARCHIVE_MD5}"):
        cifar10.load(tmp_path)


def _rewrite(archive_bytes: bytes, path: Path, link_test_to: str | None = None) -> None:
    """The subset archive with ``test_batch`` replaced by a symlink to another member."""
    with tarfile.open(fileobj=io.BytesIO(archive_bytes), mode="r:gz") as src, \
            tarfile.open(path, "w:gz") as dst:
        for info in src.getmembers():
            if info.name.endswith("/" + cifar10.TEST_BATCH) and link_test_to:
                link = tarfile.TarInfo(info.name)
                link.type, link.linkname = tarfile.SYMTYPE, link_test_to
                dst.addfile(link)
            else:
                dst.addfile(info, src.extractfile(info) if info.isreg() else None)


def test_a_member_linked_to_another_batch_is_refused(archive_bytes, tmp_path):
    _rewrite(archive_bytes, tmp_path / cifar10.ARCHIVE, link_test_to="data_batch_1")
    with pytest.raises(DataError, match=r"cifar-10-batches-py/test_batch is a link to data_batch_1"):
        cifar10.load(tmp_path)


def test_folder_symlinks_and_unreadable_batches_are_refused(archive_bytes, tmp_path, monkeypatch):
    with tarfile.open(fileobj=io.BytesIO(archive_bytes), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / cifar10.FOLDER
    (folder / cifar10.TEST_BATCH).unlink()
    (folder / cifar10.TEST_BATCH).symlink_to("data_batch_1")
    with pytest.raises(DataError, match=r"test_batch: a symlink"):
        cifar10.load(tmp_path)
    (folder / cifar10.TEST_BATCH).unlink()
    shutil.copy(folder / "data_batch_1", folder / cifar10.TEST_BATCH)
    read_bytes = Path.read_bytes

    def unreadable(self):
        if self.name == "data_batch_3":  # root reads a chmod 000 file: refuse it here instead
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)
    monkeypatch.setattr(Path, "read_bytes", unreadable)
    with pytest.raises(DataError, match=r"data_batch_3: cannot be read \(Permission denied\)"):
        cifar10.load(tmp_path)


def test_download_verifies_a_file_already_there_and_a_read_only_folder(archive_bytes, tmp_path, monkeypatch):
    (tmp_path / cifar10.ARCHIVE).write_bytes(archive_bytes)  # the subset: not the official md5
    with pytest.raises(DataError, match=rf"md5 \w+, the official archive has {cifar10.ARCHIVE_MD5}"):
        cifar10.download(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(cifar10.tempfile, "mkstemp", refuse)
    with pytest.raises(DataError, match=r"cannot download into .*empty \(Permission denied\)"):
        cifar10.download(tmp_path / "empty", url="file:///nonexistent")
