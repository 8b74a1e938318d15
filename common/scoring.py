"""Predictive perplexity, the CoRD selection score (docs/method.md, step 4).

    S = exp( (1/M) * sum_m log p_meta(a_m | context, a_<m) ),
    context = trajectory + candidate + "</think> The final answer is "

S is the inverse perplexity of the reference answer's M tokens: in [0, 1], higher is
better. Engines return the per-token log-probabilities; the math lives here, once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def predictive_score(answer_logprobs: Sequence[float]) -> float:
    """exp of the mean log-probability of the reference answer's tokens."""
    if len(answer_logprobs) == 0:
        raise ValueError("the reference answer has no tokens under the meta-prover's tokenizer")
    return math.exp(math.fsum(answer_logprobs) / len(answer_logprobs))
