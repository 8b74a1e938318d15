import math

import pytest

from cord.common.scoring import predictive_score


def test_predictive_score_is_inverse_perplexity():
    lps = [math.log(0.5), math.log(0.125)]
    assert predictive_score(lps) == pytest.approx(0.25)
    assert predictive_score([0.0, 0.0]) == 1.0


def test_empty_answer_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        predictive_score([])
