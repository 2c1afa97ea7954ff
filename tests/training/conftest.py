"""Fixtures of the training tests: the small demo data set, generated once per session."""

from __future__ import annotations

import pytest

from gazelit.training.demo import ensure_demo_data

from .helpers import demo_data_config


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    return ensure_demo_data(demo_data_config(tmp_path_factory.mktemp("data") / "demo"))
