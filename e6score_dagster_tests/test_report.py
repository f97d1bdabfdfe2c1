"""The comparison table, the stage curves and the log lines a user reads after a fit."""

from __future__ import annotations

import base64
import re

import pytest

from e6score_dagster.plots import stage_curves_md
from e6score_dagster.report import (
    INLINE_MARKDOWN_CHARS,
    comparison_table_md,
    gain_over,
    sig,
    summary_lines,
)

CANDIDATES = {
    "constant": {"nll": 1.8801234567, "spearman": 0.0, "mae": 101.23456, "coverage_50": 0.51,
                 "coverage_80": 0.79, "coverage_95": 0.949},
    "linear": {"val_nll": 1.5301, "nll": 1.5224323695220556, "spearman": 0.70123456,
               "mae": 80.5, "coverage_50": 0.5, "coverage_80": 0.8, "coverage_95": 0.95},
    "deep": {"val_nll": 1.49, "nll": 1.4801, "spearman": 0.7201, "mae": 12345.678,
             "coverage_50": 0.4999, "coverage_80": 0.8012, "coverage_95": 0.9511},
}


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.5224323695220556, "1.522"), (0.70123456, "0.7012"), (12345.678, "12350"),
     (101.23456, "101.2"), (0.0, "0"), (-0.0123456, "-0.01235"), (float("nan"), "–"),
     (None, "–")],
)
def test_sig_rounds_to_four_significant_digits_without_exponents(value, text):
    assert sig(value) == text


def _rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("|")]


def test_comparison_table_has_a_row_per_candidate_and_marks_the_chosen_one():
    md = comparison_table_md(CANDIDATES, "deep", n_posts=2000)
    header, rule, *rows = _rows(md)
    assert header == ["model", "val NLL", "NLL", "Spearman", "MAE", "cov 50%", "cov 80%",
                      "cov 95%"]
    assert len(rule) == len(header)
    assert [r[0] for r in rows] == ["constant", "linear", "**deep** ✓"]
    assert rows[0][1] == "–"  # the constant has no validation NLL
    assert rows[1][2] == "1.522" and rows[1][3] == "0.7012"
    assert rows[2][2] == "1.480" and rows[2][4] == "12350"
    assert "2,000 held-out posts" in md
    # Nothing printed with more than four significant digits.
    assert not re.search(r"\d\.\d{5,}", md)


def test_comparison_table_of_many_candidates_still_shows_inline_in_the_ui():
    many = {f"candidate_{i}": CANDIDATES["linear"] for i in range(7)}
    assert len(comparison_table_md(many, "candidate_3", n_posts=600_000)) < INLINE_MARKDOWN_CHARS


def test_columns_nobody_has_are_left_out():
    md = comparison_table_md({"linear": {"nll": 1.5}, "deep": {"nll": 1.4}}, "linear")
    header, _, *rows = _rows(md)
    assert header == ["model", "NLL"]
    assert rows[0][0] == "**linear** ✓"


def test_gain_over_linear():
    assert gain_over(CANDIDATES, "deep", "linear") == pytest.approx(1.5224323695 - 1.4801)
    assert gain_over(CANDIDATES, "deep", "additive") != gain_over(CANDIDATES, "deep", "additive")


def test_summary_is_a_few_lines_not_a_dict():
    lines = summary_lines(CANDIDATES, "deep", {"linear": 300, "deep": 0},
                          {"linear": True, "deep": False}, n_posts=2000)
    assert 2 <= len(lines) <= 4
    text = "\n".join(lines)
    assert "{" not in text and "1.5224323695" not in text
    assert "deep 1.480 (chosen)" in lines[0] and "2,000 held-out posts" in lines[0]
    assert "0.0423 better than linear" in lines[1]
    assert "deep best at step 0 (not kept)" in lines[2]


def _png(md: str) -> bytes:
    match = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert match, md[:200]
    return base64.b64decode(match.group(1))


def test_stage_curves_are_one_plot_and_say_when_a_stage_was_not_kept():
    curves = {
        "linear": [(s, 2.0 - s / 1000) for s in range(0, 400, 25)],
        "additive": [(s, 1.9 - s / 1000) for s in range(25, 500, 25)],
        "deep": [(0, 1.47), (4, 1.48), (8, 1.497)],
    }
    md = stage_curves_md(curves, {"linear": 375, "additive": 475, "deep": 0},
                         {"linear": True, "additive": True, "deep": False})
    assert md.count("data:image/png") == 1
    assert _png(md).startswith(b"\x89PNG")
    assert "The deep stage was not kept" in md
    assert "linear stage" not in md and "additive stage was" not in md


def test_stage_curves_with_every_stage_kept_have_no_sentence():
    md = stage_curves_md({"deep": [(25, 1.5), (50, 1.4)]}, {"deep": 50}, {"deep": True})
    assert md.count("data:image/png") == 1 and "not kept" not in md
