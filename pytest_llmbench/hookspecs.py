"""Hooks that conftest files and plugins may implement. Documentation only."""

from __future__ import annotations

from typing import Any

import pytest


def pytest_llmbench_sim_config(config: pytest.Config) -> dict[str, Any] | None:
    """Settings for the built-in simulator started by ``--llm-sim``.

    Return a dict of :class:`pytest_llmbench.sim.SimConfig` fields (for example
    ``{"answer_key": [...], "rpm": 3000}``). Called once, in the controlling process,
    from the conftest files of the paths given on the command line. ``answer_key``
    lists from several implementations are concatenated; other fields: the last wins.
    """
