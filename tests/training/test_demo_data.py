"""The demo data set a recipe's `demo:` section asks for: generated once, atomically."""

from __future__ import annotations

import pytest

from gazelit.recipe import DemoDataConfig
from gazelit.training.demo import demo_data_ready, ensure_demo_data


def small(out) -> DemoDataConfig:
    return DemoDataConfig(out=str(out), train=8, val=4, test=0, shard_size=4)


def test_generated_once_into_place_with_nothing_left_behind(tmp_path):
    out = tmp_path / "demo"
    assert ensure_demo_data(small(out)) == out and demo_data_ready(out)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["train", "val"]
    assert len(list((out / "shards" / "train").glob("*.tar"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging folder left
    stamp = (out / "corpus.txt").stat().st_mtime_ns
    ensure_demo_data(small(out))
    assert (out / "corpus.txt").stat().st_mtime_ns == stamp  # present: not generated again


def test_an_incomplete_folder_is_reported_not_used(tmp_path):
    out = tmp_path / "demo"
    (out / "shards").mkdir(parents=True)  # e.g. a copy that was interrupted
    (out / "shards" / "junk").write_text("x")
    with pytest.raises(RuntimeError, match="no complete demo data set"):
        ensure_demo_data(small(out))


def test_data_made_with_other_settings_is_refused_not_reused(tmp_path):
    out = tmp_path / "demo"
    ensure_demo_data(small(out))
    changed = small(out)
    changed.train_questions, changed.tasks = 3, ["shape_of"]
    with pytest.raises(RuntimeError, match="other settings .*tasks, train_questions"):
        ensure_demo_data(changed)


def test_data_from_an_older_generator_is_refused(tmp_path):
    """Records gained `boxes` (look spans): data written before then names the difference."""
    import json

    out = tmp_path / "demo"
    ensure_demo_data(small(out))
    settings = out / "demo_settings.json"
    old = json.loads(settings.read_text())
    del old["records_version"]
    settings.write_text(json.dumps(old))
    with pytest.raises(RuntimeError, match="other settings .*records_version"):
        ensure_demo_data(small(out))
