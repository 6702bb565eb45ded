"""The preprocessed-case cache: exact items, rebuilt when a file or the preprocessing changes,
corrupt entries never trusted, inputs never touched."""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from guided_diffusion import bratsloader, volume_cache
from guided_diffusion.bratsloader import BratsDataset, discover_cases
from guided_diffusion.volume_cache import CachedBratsDataset
from fixtures_data import TINY_GEOMETRY, digest, make_tiny_dataset


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("cache_data"))


@pytest.fixture()
def cases(dataset_root, tmp_path):
    # a private copy: some tests edit files
    import shutil

    root = tmp_path / "training"
    shutil.copytree(dataset_root / "training", root)
    found, errors = discover_cases(root, geometry=TINY_GEOMETRY)
    assert not errors and len(found) == 3
    return found


def assert_same_item(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key]


def test_cached_items_equal_the_files_and_are_served_from_disk(cases, tmp_path, monkeypatch):
    plain = BratsDataset(cases, TINY_GEOMETRY)
    cached = CachedBratsDataset(cases, tmp_path / "cache", TINY_GEOMETRY)
    before = digest(cases[0].folder.parent)
    first = [cached[i] for i in range(3)]
    for i in range(3):
        assert_same_item(first[i], plain[i])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3

    def no_file_reads(*args, **kwargs):
        raise AssertionError("load_case called: the cache was not used")

    monkeypatch.setattr(bratsloader, "load_case", no_file_reads)
    for i in range(3):
        assert_same_item(cached[i], first[i])
    assert digest(cases[0].folder.parent) == before  # inputs never modified


def test_changed_file_gives_a_new_entry_and_removes_the_stale_one(cases, tmp_path):
    cached = CachedBratsDataset(cases, tmp_path / "cache", TINY_GEOMETRY)
    old = cached[0]
    old_entry = cached.entry_path(cases[0])
    path = cases[0].files["t1n"]
    image = nib.load(path)
    data = np.asarray(image.get_fdata())
    nib.save(nib.Nifti1Image(data[::-1].copy(), image.affine, image.header), path)  # new content, same name
    new = cached[0]
    assert not torch.equal(new["volumes"][0], old["volumes"][0])
    assert_same_item(new, BratsDataset(cases, TINY_GEOMETRY)[0])
    assert not old_entry.exists() and cached.entry_path(cases[0]).exists()


def test_preprocessing_version_is_part_of_the_key(cases, tmp_path, monkeypatch):
    cached = CachedBratsDataset(cases, tmp_path / "cache", TINY_GEOMETRY)
    key = cached.entry_path(cases[0]).name
    monkeypatch.setattr(volume_cache, "PREPROCESSING_VERSION", volume_cache.PREPROCESSING_VERSION + 1)
    assert cached.entry_path(cases[0]).name != key


def test_corrupt_entry_is_rebuilt_not_trusted(cases, tmp_path, caplog):
    cached = CachedBratsDataset(cases, tmp_path / "cache", TINY_GEOMETRY)
    good = cached[1]
    entry = cached.entry_path(cases[1])
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again = cached[1]
    assert_same_item(again, good)
    assert "unreadable cache entry" in caplog.text and str(entry) in caplog.text
    with np.load(entry) as data:  # and the entry was rewritten whole
        assert np.array_equal(data["volumes"], good["volumes"].numpy())
