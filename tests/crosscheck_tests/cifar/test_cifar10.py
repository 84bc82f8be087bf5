"""CIFAR-10 loader (archive and folder, every kind of bad file), the numpy pipeline, and short parity runs."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from crosscheck import cli
from crosscheck.cifar import data as cifar10
from crosscheck.cifar.data import DataError
from crosscheck.cifar.parity import Config, run


@pytest.fixture(scope="module")
def data(cifar_dir):
    return cifar10.load(cifar_dir)


def test_reads_the_real_subset(data):
    # Facts from the subset's README: 5 x 1017 training and 1017 test images, official order.
    assert data.train_images.shape == (5085, 3, 32, 32) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (1017, 3, 32, 32)
    assert data.train_labels[:5].tolist() == [6, 9, 9, 4, 1]
    assert np.bincount(data.test_labels).tolist() == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


def test_folder_layout_reads_the_same(cifar_dir, data, tmp_path):
    with tarfile.open(cifar_dir / cifar10.ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = cifar10.load(tmp_path)
    assert folder.source.endswith(cifar10.FOLDER)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(folder, name), getattr(data, name))


def test_data_dir_from_environment(cifar_dir, monkeypatch):
    monkeypatch.setenv(cifar10.ENV_VAR, str(cifar_dir))
    assert cifar10.data_dir() == cifar_dir
    assert cifar10.data_dir("elsewhere") == cifar10.Path("elsewhere")
    monkeypatch.delenv(cifar10.ENV_VAR)
    assert cifar10.data_dir() == cifar10.DEFAULT_DIR


def _archive_bytes(cifar_dir) -> bytes:
    return (cifar_dir / cifar10.ARCHIVE).read_bytes()


def test_truncated_archive(cifar_dir, tmp_path):
    raw = _archive_bytes(cifar_dir)
    (tmp_path / cifar10.ARCHIVE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=rf"{cifar10.ARCHIVE}: truncated or corrupt archive"):
        cifar10.load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cifar10.ARCHIVE]  # nothing extracted


def test_corrupt_archive(cifar_dir, tmp_path):
    raw = bytearray(_archive_bytes(cifar_dir))
    raw[len(raw) // 3: len(raw) // 3 + 64] = bytes(64)
    (tmp_path / cifar10.ARCHIVE).write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"truncated or corrupt archive"):
        cifar10.load(tmp_path)


def test_wrong_file(tmp_path):
    (tmp_path / cifar10.ARCHIVE).write_text("<html>404 not found</html>")
    with pytest.raises(DataError, match=r"truncated or corrupt archive"):
        cifar10.load(tmp_path)


def _tar_with(tmp_path, members: dict[str, bytes]) -> None:
    with tarfile.open(tmp_path / cifar10.ARCHIVE, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{cifar10.FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _batch(n=4, **overrides) -> bytes:
    batch = {"batch_label": "x", "labels": list(range(n)), "data": np.zeros((n, 3072), np.uint8), **overrides}
    return pickle.dumps(batch, protocol=2)


def test_archive_missing_a_member(tmp_path):
    _tar_with(tmp_path, {"data_batch_1": _batch()})
    with pytest.raises(DataError, match=r"no member cifar-10-batches-py/data_batch_2"):
        cifar10.load(tmp_path)


def _folder(tmp_path, **replace) -> None:
    folder = tmp_path / cifar10.FOLDER
    folder.mkdir()
    for name in (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH):
        (folder / name).write_bytes(replace.get(name, _batch()))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("payload, message", [
    (b"\x80\x02garbage", r"data_batch_3: not a CIFAR-10 batch file \(unpickling failed"),
    (pickle.dumps(_Evil(), protocol=2), r"data_batch_3: .*forbidden global __builtin__\.print"),
    (pickle.dumps({"labels": [1]}, protocol=2), r"data_batch_3: .*expected keys 'data' and 'labels'"),
    (_batch(data=np.zeros((4, 1024), np.uint8)), r"data_batch_3: 'data' should be uint8 of shape \(n, 3072\), "
                                                 r"found uint8 \(4, 1024\)"),
    (_batch(labels=[0, 1, 2, 10]), r"data_batch_3: 'labels' should be 4 integers in 0\.\.9"),
])
def test_bad_batch_files(tmp_path, payload, message):
    _folder(tmp_path, data_batch_3=payload)
    with pytest.raises(DataError, match=message):
        cifar10.load(tmp_path)


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=rf"no CIFAR-10 in {tmp_path}.*{cifar10.ARCHIVE}.*{cifar10.ENV_VAR}.*--download"):
        cifar10.load(tmp_path)


def test_download_offline_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match=rf"cannot download .* Offline\? Put {cifar10.ARCHIVE}"):
        cifar10.download(tmp_path, url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    assert list(tmp_path.iterdir()) == []


def test_download_checks_md5(cifar_dir, tmp_path, monkeypatch):
    url = (cifar_dir / cifar10.ARCHIVE).resolve().as_uri()
    with pytest.raises(DataError, match=rf"md5 .*expected {cifar10.ARCHIVE_MD5}"):
        cifar10.download(tmp_path / "a", url=url)  # the subset is not the official file
    assert list((tmp_path / "a").iterdir()) == []
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(_archive_bytes(cifar_dir)).hexdigest())
    target = cifar10.download(tmp_path / "b", url=url)
    assert target.read_bytes() == _archive_bytes(cifar_dir)
    assert cifar10.load(tmp_path / "b").train_images.shape[0] == 5085


def test_normalize_is_totensor_then_normalize(data):
    images = data.train_images[:64]
    expected = torch.from_numpy(images).float().div(255).sub(torch.tensor(0.5)).div(torch.tensor(0.5))
    np.testing.assert_array_equal(cifar10.normalize(images), expected.numpy())


def test_batches_are_seeded_and_cover_the_epoch(data):
    def labels(seed, epoch):
        return np.concatenate([y for _, y in cifar10.batches(data.train_images, data.train_labels, 32,
                                                             seed=seed, epoch=epoch)])
    sizes = [len(y) for _, y in cifar10.batches(data.train_images, data.train_labels, 32, seed=0, epoch=0)]
    assert sizes[:-1] == [32] * 158 and sizes[-1] == 5085 - 158 * 32  # the last batch is partial
    np.testing.assert_array_equal(labels(0, 0), labels(0, 0))
    assert not np.array_equal(labels(0, 0), labels(0, 1))
    assert np.array_equal(np.sort(labels(0, 1)), np.sort(data.train_labels))


def test_augmentation_is_a_padded_crop_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)
    out = cifar10.augment(images, np.random.default_rng(1))
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    for image, result in zip(padded, out):
        windows = [image[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(np.array_equal(result, w) or np.array_equal(result, w[:, :, ::-1]) for w in windows)
    assert not np.array_equal(out, images)


def test_short_shared_grads_run_is_bitwise(data):
    result = run(Config(mode="shared-grads", max_steps=25), data, progress=False)
    assert result.passed, result.checks
    assert result.shared_max_ulps == [0] * 25
    assert result.logit_gap < 1e-5


@pytest.mark.slow   # ~25 s: two independent trainings; the shared-gradient run stays in the default run
def test_short_independent_run_stays_in_the_band(data):
    result = run(Config(mode="independent", max_steps=40, replicas=2), data, progress=False)
    print(result.checks)
    assert result.passed, result.checks
    assert {c["check"].split(":")[0] for c in result.checks} >= {"logits before training", "jax_impl.adamw"}


def test_cli_writes_the_report(cifar_dir, tmp_path, capsys):
    status = cli.main(["--no-progress", "--out", str(tmp_path), "cifar10", "--data-dir", str(cifar_dir),
                       "--max-steps", "12", "--replicas", "1", "--augment"])
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and len(report["step_loss"]["jax_impl.adamw"]) == 12
    assert (tmp_path / "cifar10.png").stat().st_size > 0
    assert "| check | value | bound |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "invalid batch_size: 0"),
    (["--lr", "-1"], "invalid lr: -1.0"),
    (["--replicas", "0"], "invalid replicas: 0"),
])
def test_cli_bad_values(cifar_dir, argv, message, capsys):
    assert cli.main(["cifar10", "--data-dir", str(cifar_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_data(tmp_path, capsys):
    assert cli.main(["cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "no CIFAR-10 in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cifar10", "--mode", "both"])
    assert exit_info.value.code == 2
