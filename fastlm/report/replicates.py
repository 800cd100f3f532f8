"""Seeds as replicates: a point's mean and spread over its seeds, and whether a difference between two cells is
larger than the seeds' spread.

The verdict's rule: a difference is beyond seed noise when both sides have at least two seeds, the difference
of the means exceeds twice its standard error (sqrt(s_a^2/n_a + s_b^2/n_b), the "+-" the report prints), and
the two sides' seed ranges (min-max) do not overlap. Two or three seeds estimate a spread roughly, so the rule
asks for both; a difference it calls "within seed noise" may still be real, only not shown by these runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

MIN_SEEDS = 2  # a spread needs two runs
SIGMAS = 2.0  # the difference must exceed this many standard errors


def spread(values: list) -> Optional[dict]:
    """n, mean, standard deviation (n - 1; 0 for one value), min and max of the values present."""
    present = [value for value in values if value is not None and math.isfinite(value)]
    if not present:
        return None
    return {"n": len(present), "mean": statistics.fmean(present),
            "std": statistics.stdev(present) if len(present) > 1 else 0.0,
            "min": min(present), "max": max(present)}


def compare(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    """b's mean minus a's, the standard error of that difference, and the verdict: True beyond seed noise, False
    within it, None when a side has fewer than MIN_SEEDS seeds (no spread to compare with)."""
    if a is None or b is None:
        return None
    difference = b["mean"] - a["mean"]
    error = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    if min(a["n"], b["n"]) < MIN_SEEDS:
        beyond = None
    else:
        apart = a["max"] < b["min"] or b["max"] < a["min"]
        beyond = apart and abs(difference) > SIGMAS * error
    return {"difference": difference, "error": error, "beyond": beyond,
            "relative": difference / a["mean"] if a["mean"] else None}


def verdict(comparison: Optional[dict], subject: str, quantity: tuple[str, str], digits: int = 0,
            unit: str = "") -> str:
    """"GRU lower by 31 +- 9 (beyond seed noise)", with ``quantity`` the words for (lower, higher)."""
    if comparison is None:
        return f"{subject}: no result to compare"
    difference, error = comparison["difference"], comparison["error"]
    word = quantity[0] if difference < 0 else quantity[1]
    judged = {True: "beyond seed noise", False: "within seed noise",
              None: "one seed: no spread to judge it by"}[comparison["beyond"]]
    return f"{subject} {word} by {abs(difference):,.{digits}f}{unit} +- {error:,.{digits}f}{unit} ({judged})"
