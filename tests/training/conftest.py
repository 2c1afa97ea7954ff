"""Fixtures of the training tests: the small demo data set, generated once per session."""

from __future__ import annotations

import pytest

from gazelit.recipe import DemoDataConfig
from gazelit.training.demo import ensure_demo_data

from .helpers import DEMO_DATA


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    return ensure_demo_data(DemoDataConfig(out=str(tmp_path_factory.mktemp("data") / "demo"), **DEMO_DATA))
