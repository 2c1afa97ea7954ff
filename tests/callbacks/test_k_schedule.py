"""The progressive k schedule: endpoints, monotone shapes, span 0, never increasing, state and resume."""

from __future__ import annotations

import itertools

import pytest
import torch

from gazelit.callbacks.k_schedule import KSchedule, ProgressiveTopK, lower_k

DENSE = None
R = 16  # regions per unit (e.g. an 8x8 grid in 2x2 regions)


def ks(schedule: KSchedule, steps=range(130)) -> list[int | None]:
    return [schedule.k_at(s) for s in steps]


def not_increasing(values: list[int | None]) -> bool:
    big = 10**9
    as_int = [big if v is None else v for v in values]
    return all(a >= b for a, b in itertools.pairwise(as_int))


@pytest.mark.parametrize("shape", ["linear", "cosine", "step"])
def test_dense_at_start_target_at_end_and_never_increasing(shape):
    schedule = KSchedule(target=4, dense_level=R, start_step=20, span_steps=100, shape=shape, steps=4)
    values = ks(schedule)
    assert values[:21] == [DENSE] * 21  # dense up to and including start_step
    assert values[120:] == [4] * 10  # the target exactly from the end of the span on
    assert not_increasing(values)
    assert all(v is None or 4 <= v <= R for v in values)
    assert len({v for v in values if v is not None}) > 1  # it actually passes through intermediate k


def test_linear_and_cosine_midpoints():
    linear = KSchedule(target=4, dense_level=R, start_step=0, span_steps=100, shape="linear")
    cosine = KSchedule(target=4, dense_level=R, start_step=0, span_steps=100, shape="cosine")
    assert linear.k_at(50) == 10 and cosine.k_at(50) == 10  # 16 - 12 * 0.5
    assert linear.k_at(25) == 13 and cosine.k_at(25) == 14  # cosine leaves dense more slowly
    assert linear.fraction(100) == cosine.fraction(100) == 1.0


def test_step_shape_has_equal_plateaus():
    schedule = KSchedule(target=4, dense_level=R, start_step=0, span_steps=100, shape="step", steps=4)
    assert ks(schedule, [0, 24, 25, 49, 50, 74, 75, 99, 100]) == [DENSE, DENSE, 13, 13, 10, 10, 7, 7, 4]


@pytest.mark.parametrize("start", [0, 7])
def test_span_zero_is_sparse_from_the_start_step(start):
    schedule = KSchedule(target=4, dense_level=R, start_step=start, span_steps=0)
    assert ks(schedule, range(start + 5)) == [DENSE] * start + [4] * 5


def test_no_target_means_always_dense_and_a_target_above_the_regions_is_reached_at_once():
    assert set(ks(KSchedule(target=None, dense_level=R, span_steps=50))) == {DENSE}
    assert ks(KSchedule(target=32, dense_level=R, start_step=0, span_steps=10), [0, 1, 10]) == [DENSE, 32, 32]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="shape"):
        KSchedule(target=4, dense_level=R, shape="exponential")
    with pytest.raises(ValueError, match=">= 0"):
        ProgressiveTopK(span_steps=-1)


class FakeModule:
    """What the callback touches of a GazeVLMModule."""

    def __init__(self):
        self.k = "unset"
        self.logged = {}

    def set_top_k(self, k):
        self.k = k

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def callback(**settings) -> ProgressiveTopK:
    cb = ProgressiveTopK(**settings, target=4, dense_level=R)
    cb.schedule = KSchedule(target=4, dense_level=R, **cb.settings)
    return cb


def test_callback_sets_k_before_every_batch_and_logs_progress():
    cb, module = callback(start_step=0, span_steps=10, shape="linear"), FakeModule()

    class Trainer:
        global_step = 5

    cb.on_train_batch_start(Trainer, module, {"input_ids": torch.zeros(3, 1)}, 0)
    assert module.k == 10 and module.logged["gaze/k_schedule_progress"] == 0.5


def test_state_round_trip_resumes_the_same_k_and_an_edited_schedule_never_raises_k():
    cb, module = callback(start_step=0, span_steps=10), FakeModule()
    for step in range(8):
        cb.apply(module, step)
    state = cb.state_dict()
    assert state["lowest"] == cb.apply(module, 7)

    resumed = callback(start_step=0, span_steps=10)
    resumed.load_state_dict(state)
    assert resumed.apply(FakeModule(), 8) == cb.apply(FakeModule(), 8)

    slower = callback(start_step=0, span_steps=100)  # the recipe was edited: this schedule is near dense at step 8
    slower.load_state_dict(state)
    k = slower.apply(FakeModule(), 8)
    assert k is not None and k <= state["lowest"]


def test_lower_k_treats_none_as_dense():
    assert lower_k(None, 5) == 5 and lower_k(5, None) == 5 and lower_k(None, None) is None and lower_k(3, 5) == 3
