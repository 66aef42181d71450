"""The command line's logging: slimrank's own INFO lines show, libraries' INFO lines do not."""

from __future__ import annotations

import logging

import pytest

from slimrank import cli


@pytest.fixture
def clean_root_logger():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("slimrank").level)
    root.handlers.clear()
    yield
    root.handlers[:], level, own = saved
    root.setLevel(level)
    logging.getLogger("slimrank").setLevel(own)


@pytest.mark.usefixtures("clean_root_logger")
@pytest.mark.parametrize(
    ("argv", "own", "library"),
    [
        ([], logging.INFO, logging.WARNING),
        (["-v"], logging.DEBUG, logging.WARNING),
        (["-vv"], logging.DEBUG, logging.DEBUG),
    ],
)
def test_log_levels_follow_verbosity(argv: list[str], own: int, library: int) -> None:
    assert cli.main([*argv, "data", "info", "/nonexistent/logs.csv"]) == 2
    assert logging.getLogger("slimrank.pipeline").getEffectiveLevel() == own
    assert logging.getLogger("faiss.loader").getEffectiveLevel() == library
