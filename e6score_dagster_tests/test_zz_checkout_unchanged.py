"""Runs last (modules run in name order): the suite left nothing behind in the checkout."""

from __future__ import annotations

import pytest

from e6score_dagster_tests.conftest import checkout_state


def test_the_suite_leaves_the_checkout_as_it_found_it(checkout_before):
    before = checkout_before
    if before is None:
        pytest.skip("not a git checkout")
    after = checkout_state()
    assert after is not None
    assert sorted(after - before) == [], "left in the checkout by the tests"
    assert sorted(before - after) == [], "removed from the checkout by the tests"
