"""verify's pass rule on hand-made scores: allclose, then arg-max agreement with near-ties."""
import math

import pytest
import torch

from dmf_export.contract import TOLERANCES
from dmf_export.verify import compare, describe_ties

FP16, FP32 = TOLERANCES["fp16"], TOLERANCES["fp32"]


def scores(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_identical_scores_pass_with_full_agreement():
    expected = scores([12.0, 11.5, 11.0], [10.0, 10.5, 9.0])
    result = compare(expected.clone(), expected, FP32, "2q")
    assert (result.passed, result.agreement, result.near_ties, result.max_abs) == (True, 1.0, 0, 0.0)


def test_a_flip_between_classes_the_original_ties_within_tolerance_is_a_near_tie():
    # the original prefers class 1 by 1e-4; fp16 (step 2^-7 at 12) picks class 0.
    # tolerance at 12.0001: 0.01 + 0.01 * 12.0001 = 0.130001 ≥ the 1e-4 shortfall
    expected = scores([12.0, 12.0001, 11.0])
    result = compare(scores([12.0078125, 12.0, 11.0]), expected, FP16, "1q")
    assert result.agreement == 0.0 and result.near_ties == 1 and result.passed


def test_a_flip_the_original_decides_fails_even_when_every_score_is_within_tolerance():
    # every |a - b| = 0.11 ≤ 0.01 + 0.01 * 12 = 0.13, but the original prefers class 1
    # by 0.2 > 0.01 + 0.01 * 12.2 = 0.132: a wrong prediction, not a tie
    expected = scores([12.0, 12.2, 11.0])
    result = compare(scores([12.11, 12.09, 11.0]), expected, FP16, "1q")
    assert result.max_abs == pytest.approx(0.11)
    assert result.agreement == 0.0 and result.near_ties == 0 and not result.passed


def test_min_agreement_allows_one_decided_flip_in_a_hundred_at_fp16():
    expected = scores(*([[12.0, 12.2]] * 100))
    flipped = expected.clone()
    flipped[0] = torch.tensor([12.11, 12.09])
    result = compare(flipped, expected, FP16, "100q")
    assert result.agreement == 0.99 and result.passed  # min_agreement 0.99
    flipped[1] = flipped[0]
    assert not compare(flipped, expected, FP16, "100q").passed


def test_fp32_tie_threshold_is_its_own_tolerance():
    # 1e-4 + 1e-4 * 1.00005 ≈ 2.0e-4: a 5e-5 gap ties, a 3e-4 gap does not
    assert compare(scores([1.00003, 1.0]), scores([1.0, 1.00005]), FP32, "tie").passed
    result = compare(scores([1.0002, 1.0]), scores([1.0, 1.0003]), FP32, "decided")
    assert result.near_ties == 0 and not result.passed


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_fail(bad):
    expected = scores([1.0, 0.0])
    assert not compare(scores([bad, 0.0]), expected, FP16, "1q").passed


def test_wrong_shape_fails():
    result = compare(scores([1.0, 0.0, 0.0]), scores([1.0, 0.0]), FP32, "1q")
    assert not result.passed and result.max_abs == math.inf


def test_describe_ties():
    assert (describe_ties(0), describe_ties(1), describe_ties(6)) == (
        "", " (+1 near-tie)", " (+6 near-ties)")
