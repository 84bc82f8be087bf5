"""CIFAR-10 in the official python format, without torchvision, and one numpy pipeline for both frameworks.

The data directory holds ``cifar-10-batches-py/`` or the official
``cifar-10-python.tar.gz`` (as torchvision's ``root`` does); the archive is
read in place, member by member, so nothing is ever half-extracted.  Where the
directory is: the ``data_dir`` argument, else ``$CROSSCHECK_CIFAR10_DIR``, else
``~/.cache/crosscheck/cifar10``.  :func:`download` fetches the official
archive into it and checks its md5 before the file takes its final name.

Every problem with the files raises :class:`DataError` naming the file and
what is wrong with it: sizes are checked before anything is read (a batch of
more than ``MAX_BATCH_BYTES``, an archive unpacking to more than
``MAX_ARCHIVE_BYTES``), the batches are unpickled only after the whole gzip
stream checked out, allowing numpy arrays only, and a batch without images
is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_VAR = "CROSSCHECK_CIFAR10_DIR"
DEFAULT_DIR = Path.home() / ".cache" / "crosscheck" / "cifar10"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_SIZE = 170_498_071  # bytes of the official archive: a file this size must have its md5
FOLDER = "cifar-10-batches-py"
# Sizes are checked before anything is read: an official batch file holds 31,035,704 bytes (10,000
# images) and the whole archive unpacks to 186 MB, so a bigger member or stream is refused unread.
MAX_BATCH_BYTES = 64 << 20
MAX_ARCHIVE_BYTES = 512 << 20
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# torchvision's ToTensor then Normalize((0.5,)*3, (0.5,)*3), as float32 operations.
MEAN = np.float32(0.5)
STD = np.float32(0.5)


class DataError(RuntimeError):
    """A missing, truncated, corrupt or wrong data file; the message names it."""


@dataclass(frozen=True)
class CIFAR10:
    """Images as uint8 NCHW (N, 3, 32, 32), labels as int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path``, else ``$CROSSCHECK_CIFAR10_DIR``, else the cache directory."""
    if path is not None:
        return Path(path)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEFAULT_DIR


class _ArraysOnly(pickle.Unpickler):
    """The batch files are pickles; allow only what they need (numpy arrays), never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # numpy 2's name; the old one warns
        return super().find_class(module, name)


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
    except Exception as err:  # pickle raises many types for bad bytes
        raise DataError(f"{where}: not a CIFAR-10 batch file (unpickling failed: {type(err).__name__}: {err})") \
            from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where}: not a CIFAR-10 batch file (expected keys 'data' and 'labels', found {keys})")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[0] == 0 and len(labels) == 0:
        raise DataError(f"{where}: holds no images (an empty batch; every CIFAR-10 batch file holds some)")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: 'data' should be uint8 of shape (n, 3072), found "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{where}: 'labels' should be {data.shape[0]} integers in 0..9, found "
                        f"{labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_folder(folder: Path) -> dict[str, bytes]:
    out = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            what = "a symlink (each batch must be its own file)" if path.is_symlink() else "missing"
            raise DataError(f"{path}: {what} (a CIFAR-10 folder holds {', '.join((*TRAIN_BATCHES, TEST_BATCH))})")
        try:
            size = path.stat().st_size
            if size > MAX_BATCH_BYTES:
                raise DataError(f"{path}: holds {size:,} bytes, more than a CIFAR-10 batch file can "
                                f"({MAX_BATCH_BYTES:,}; the official ones hold 31,035,704): refused unread")
            out[str(path)] = path.read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    return out


def _md5(path: Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            md5.update(chunk)
    return md5.hexdigest()


def _check_archive(archive: Path) -> None:
    """The official archive's md5 (a file of its size)."""
    if archive.stat().st_size == ARCHIVE_SIZE and (md5 := _md5(archive)) != ARCHIVE_MD5:
        raise DataError(f"{archive}: md5 {md5}, the official archive has {ARCHIVE_MD5}: corrupt; "
                        f"delete it and download it again")


class _Bounded(io.RawIOBase):
    """A read-only stream that refuses to give more than ``limit`` bytes: a gzip bomb is not unpacked."""

    def __init__(self, stream, limit: int, archive: Path):
        self.stream, self.left, self.limit, self.archive = stream, limit, limit, archive

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.stream.read(min(len(buffer), self.left + 1))
        if len(chunk) > self.left:
            raise DataError(f"{self.archive}: unpacks to more than {self.limit:,} bytes (the official archive "
                            "unpacks to 186 MB): refused")
        self.left -= len(chunk)
        buffer[:len(chunk)] = chunk
        return len(chunk)


def _read_archive(archive: Path) -> dict[str, bytes]:
    """The batch members, read in one pass over the stream, each checked (kind, size) before it is read.

    The stream is read to its end, so the gzip CRC and length are checked
    before any batch is unpickled (tarfile alone would stop where the last
    wanted member ends: one flipped byte inside a batch loaded as changed pixels).
    """
    wanted = {f"{FOLDER}/{name}" for name in (*TRAIN_BATCHES, TEST_BATCH)}
    found = {}
    try:
        _check_archive(archive)
        with gzip.open(archive) as unpacked:
            stream = _Bounded(unpacked, MAX_ARCHIVE_BYTES, archive)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    if info.name not in wanted:
                        continue
                    if info.name in found:
                        raise DataError(f"{archive}: {info.name} appears twice (not the official CIFAR-10 python "
                                        "archive)")
                    if not info.isreg():
                        # extracting a link would follow it: a batch linked to another would load a duplicate.
                        kind = "a link to " + info.linkname if info.issym() or info.islnk() else "not a regular file"
                        raise DataError(f"{archive}: {info.name} is {kind}, not a regular file")
                    if info.size > MAX_BATCH_BYTES:
                        raise DataError(f"{archive}: {info.name} holds {info.size:,} bytes, more than a CIFAR-10 "
                                        f"batch file can ({MAX_BATCH_BYTES:,}; the official ones hold 31,035,704): "
                                        "refused unread")
                    found[info.name] = tar.extractfile(info).read()
            while stream.read(1 << 22):  # the rest of the stream: gzip checks its CRC and length at the end
                pass
    except PermissionError as err:
        raise DataError(f"{archive}: cannot be read ({err.strerror or err})") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:  # DataError passes through
        raise DataError(f"{archive}: truncated or corrupt archive ({type(err).__name__}: {err}); "
                        f"delete it and download it again (md5 {ARCHIVE_MD5})") from None
    missing = sorted(wanted - set(found))
    if missing:
        member = missing[0]
        raise DataError(f"{archive}: no member {member} (not the official CIFAR-10 python archive)")
    return {f"{archive}:{FOLDER}/{name}": found[f"{FOLDER}/{name}"] for name in (*TRAIN_BATCHES, TEST_BATCH)}


def load(path: str | os.PathLike | None = None) -> CIFAR10:
    """Read CIFAR-10 from the data directory (see :func:`data_dir`)."""
    root = data_dir(path)
    if (root / FOLDER).is_dir():
        raw, source = _read_folder(root / FOLDER), str(root / FOLDER)
    elif (root / ARCHIVE).is_file():
        raw, source = _read_archive(root / ARCHIVE), str(root / ARCHIVE)
    else:
        raise DataError(f"no CIFAR-10 in {root}: expected {root / FOLDER}/ or {root / ARCHIVE}. Put the official "
                        f"archive there ({URL}, md5 {ARCHIVE_MD5}), point --data-dir or ${ENV_VAR} at a "
                        "directory holding it, or pass --download")
    parsed = {where: _parse_batch(data, where) for where, data in raw.items()}
    train = [parsed[w] for w in raw if not w.endswith(TEST_BATCH)]
    test = next(parsed[w] for w in raw if w.endswith(TEST_BATCH))
    return CIFAR10(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), *test, source)


def download(path: str | os.PathLike | None = None, url: str = URL) -> Path:
    """Fetch the official archive into the data directory, md5-checked.

    An archive already there is verified (md5) instead of fetched again; a
    ``cifar-10-batches-py/`` folder is left as it is (``load`` checks it).
    """
    root = data_dir(path)
    target = root / ARCHIVE
    if (root / FOLDER).is_dir():
        return target
    if target.is_file():
        try:
            md5 = _md5(target)
        except OSError as err:
            raise DataError(f"{target}: cannot be read ({err.strerror or err})") from None
        if md5 != ARCHIVE_MD5:
            raise DataError(f"{target}: md5 {md5}, the official archive has {ARCHIVE_MD5}; delete it and run "
                            "--download again")
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{ARCHIVE}.", suffix=".part", dir=root)
    except OSError as err:
        raise DataError(f"cannot download into {root} ({err.strerror or err}): choose a writable --data-dir") \
            from None
    md5 = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        if md5.hexdigest() != ARCHIVE_MD5:
            raise DataError(f"{url}: downloaded file has md5 {md5.hexdigest()}, expected {ARCHIVE_MD5}")
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"cannot download {url} ({err}). Offline? Put {ARCHIVE} (md5 {ARCHIVE_MD5}) in {root}, "
                        f"or point --data-dir or ${ENV_VAR} at a directory holding it") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 as ``Normalize(0.5, 0.5)(ToTensor()(img))``, operation by operation."""
    x = images.astype(np.float32) / np.float32(255)
    return (x - MEAN) / STD


def augment(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """RandomCrop(32, padding) with zero padding and RandomHorizontalFlip, on uint8 NCHW images."""
    n, _, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    top, left = rng.integers(0, 2 * padding + 1, n), rng.integers(0, 2 * padding + 1, n)
    rows = top[:, None] + np.arange(h)  # (n, h)
    cols = left[:, None] + np.arange(w)  # (n, w)
    out = padded[np.arange(n)[:, None, None, None], np.arange(3)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, :, ::-1]
    return out


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int, epoch: int,
            shuffle: bool = True, augmentation: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Normalized float32 NCHW batches; the order (and augmentation) depends only on (seed, epoch).

    Like ``DataLoader(shuffle=True)`` the last batch may be smaller.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(images)) if shuffle else np.arange(len(images))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        chunk = images[index]
        if augmentation:
            chunk = augment(chunk, rng)
        yield normalize(chunk), labels[index]
