"""seeding.py: every seed formula keeps the exact numbers it had when runs were first published.

The pinned values were computed with the formulas as they stood before they moved here
(train_util._seed_for, synthesis.case_generator, demo_data._case_seed), so a change to any
formula, however harmless it looks, fails here before it silently changes reproduced results.
"""
import zlib

import numpy as np
import pytest
import torch

from guided_diffusion.seeding import (case_generator, case_seed, case_seed_words, case_subset, derive_seed,
                                      indexed_generator, sample_generator, sample_seed)


@pytest.mark.parametrize("parts, expected", [
    ((0,), 5590303313954757711),
    ((0, 0), 6582228568341314215),
    ((7, 3, 0, 1), 2029722489538768123),
    ((123, 1_000_000, 2), 5793860904375278317),
])
def test_derive_seed_keeps_the_training_loop_numbers(parts, expected):
    assert derive_seed(*parts) == expected
    assert 0 <= derive_seed(*parts) < 2 ** 63


def test_derive_seed_depends_on_order_and_on_every_part():
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert len({derive_seed(0, step) for step in range(1000)}) == 1000


def test_case_seed_is_seed_times_a_prime_plus_the_crc_of_the_id():
    assert case_seed(0, "BraTS-GLI-00000-000") == 3909131625
    assert case_seed(7, "case-a") == 7 * 1_000_003 + zlib.crc32(b"case-a") == 3076808455
    assert case_seed(2 ** 62, "x") < 2 ** 63  # reduced to 63 bits


def test_case_generator_draws_what_a_generator_seeded_with_case_seed_draws():
    ours = torch.randn(5, generator=case_generator(3, "BraTS-MEN-00012-000"))
    reference = torch.randn(5, generator=torch.Generator().manual_seed(case_seed(3, "BraTS-MEN-00012-000")))
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, torch.randn(5, generator=case_generator(3, "BraTS-MEN-00013-000")))


def test_case_seed_words_feed_numpy_the_seed_and_the_crc():
    assert case_seed_words(5, "case-a") == [5, zlib.crc32(b"case-a")]
    a = np.random.default_rng(case_seed_words(5, "case-a")).integers(1 << 30, size=3)
    b = np.random.default_rng([5, 3069808434]).integers(1 << 30, size=3)
    assert (a == b).all()


def test_indexed_generator_is_seed_plus_index():
    assert torch.equal(torch.rand(4, generator=indexed_generator(10, 3)),
                       torch.rand(4, generator=torch.Generator().manual_seed(13)))


def test_case_subset_is_a_sorted_seeded_sample_or_everything():
    assert case_subset(10, 4, seed=3) == [0, 3, 6, 7]
    assert case_subset(5, 0, seed=3) == case_subset(5, 5, seed=3) == case_subset(5, 9, seed=3) == [0, 1, 2, 3, 4]
    assert case_subset(10, 4, seed=4) != case_subset(10, 4, seed=3)


def test_sample_seed_is_the_case_seed_for_sample_0_then_derived_from_it():
    assert sample_seed(0, "BraTS-GLI-00000-000", 0) == case_seed(0, "BraTS-GLI-00000-000") == 3909131625
    assert sample_seed(0, "BraTS-GLI-00000-000", 1) == 6582233843989636061  # derive_seed(3909131625, 1)
    assert sample_seed(7, "case-a", 3) == 6582234031718390401  # derive_seed(3076808455, 3)
    assert len({sample_seed(7, "case-a", m) for m in range(100)}) == 100
    with pytest.raises(ValueError, match="negative"):
        sample_seed(7, "case-a", -1)


def test_sample_generator_draws_what_a_generator_seeded_with_sample_seed_draws():
    sample_0 = torch.randn(5, generator=sample_generator(3, "c", 0))
    assert torch.equal(sample_0, torch.randn(5, generator=case_generator(3, "c")))
    reference = torch.Generator().manual_seed(sample_seed(3, "c", 2))
    assert torch.equal(torch.randn(5, generator=sample_generator(3, "c", 2)), torch.randn(5, generator=reference))
