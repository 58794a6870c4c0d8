"""The admin page's training runs: a running one's progress bar, and the record's confusion
matrix and curves as drawn."""

from __future__ import annotations

import pandas as pd

from ui.views.admin import confusion_table, curve_chart


def test_the_confusion_matrix_is_shaded_on_one_scale() -> None:
    """A column holding one misreading is as pale as an empty cell, not as dark as the diagonal."""
    styled = confusion_table([[100, 0], [0, 1]], ["cat", "dog"])
    styled._compute()
    colour = {cell: dict(props)["background-color"] for cell, props in styled.ctx.items()}
    red = {cell: int(value[1:3], 16) for cell, value in colour.items()}
    assert red[(0, 0)] < 0x40  # the diagonal's 100: dark blue
    assert red[(1, 1)] > 0xE0, colour  # the single dog: pale, as the empty cells


def test_the_curves_are_marked_at_whole_epochs() -> None:
    history = [{"epoch": 1, "loss": 0.9, "val_loss": 1.0}, {"epoch": 2, "loss": 0.5, "val_loss": 0.7}]
    spec = curve_chart(pd.DataFrame(history), ["loss", "val_loss"]).to_dict()
    axis = spec["encoding"]["x"]["axis"]
    assert axis["tickMinStep"] == 1 and axis["format"] == "d"
    rows = spec["datasets"][next(iter(spec["datasets"]))]
    assert {(r["epoch"], r["curve"]) for r in rows} == {(1, "loss"), (1, "val_loss"), (2, "loss"), (2, "val_loss")}


def _two_epochs() -> None:
    from ui.views.admin import show_curves

    show_curves(
        [
            {"epoch": 1, "loss": 0.9, "val_loss": 1.0, "accuracy": 0.5, "val_accuracy": 0.4},
            {"epoch": 2, "loss": 0.5, "val_loss": 0.7, "accuracy": 0.7, "val_accuracy": 0.6},
        ]
    )


def test_two_epochs_draw_a_loss_and_an_accuracy_chart() -> None:
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_function(_two_epochs).run()
    assert not app.exception, app.exception
    assert len(app.get("vega_lite_chart")) == 2


def _one_diverged_epoch() -> None:
    from ui.views.admin import show_curves

    show_curves([{"epoch": 1, "seconds": 4.0, "loss": None, "val_loss": None, "accuracy": 0.1, "val_accuracy": None}])


def test_one_epoch_whose_numbers_are_not_finite_is_said() -> None:
    """A diverged epoch's loss is None in the run's history: the page failed formatting it."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_function(_one_diverged_epoch).run()
    assert not app.exception, app.exception
    [caption] = [c.value for c in app.caption]
    assert caption == (
        "Epoch 1: loss not a finite number, validation loss not a finite number, accuracy 10.0%, "
        "validation accuracy not a finite number"
    )


def _diverged_after_two_epochs() -> None:
    from ui.views.admin import show_curves

    show_curves(
        [
            {"epoch": 1, "loss": 0.9, "val_loss": 1.0, "accuracy": 0.5, "val_accuracy": 0.4},
            {"epoch": 2, "loss": 0.5, "val_loss": float("inf"), "accuracy": 0.7, "val_accuracy": 0.6},
            {"epoch": 3, "loss": None, "val_loss": None, "accuracy": 0.1, "val_accuracy": 0.1},
        ]
    )


def test_numbers_that_are_not_finite_are_left_out_of_the_curves_and_said() -> None:
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_function(_diverged_after_two_epochs).run()
    assert not app.exception, app.exception
    assert len(app.get("vega_lite_chart")) == 2
    assert "not drawn: loss at epoch 3; validation loss at epochs 2, 3." in app.caption[0].value


def test_a_curve_with_a_missing_number_is_drawn_with_a_gap() -> None:
    """The chart's data holds null there: JSON has no NaN, and a NaN left in it breaks the chart."""
    history = [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": None}, {"epoch": 3, "loss": float("nan")}]
    spec = curve_chart(pd.DataFrame(history), ["loss"]).to_dict()
    rows = spec["datasets"][next(iter(spec["datasets"]))]
    assert [r["value"] for r in rows] == [0.9, None, None]


def _run_in_its_first_epoch(step: int | None) -> None:
    from ui.views.admin import show_run

    run = {
        "id": "7b0c5c5e-0000-4000-8000-000000000002",
        "status": "running",
        "options": {"epochs": 4},
        "epoch": 0,
        "step": step,
        "steps": 120 if step is not None else None,
        "eta_seconds": 90.0 if step is not None else None,
        "history": [],
        "promotion": None,
        "record": None,
        "cancel_requested_at": None,
    }
    show_run(None, run)  # type: ignore[arg-type]  # the API is used only on Cancel


def test_a_running_runs_bar_counts_the_steps_of_the_epoch_in_progress() -> None:
    """The bar and its text moved only at each epoch's end (40 s to minutes): in the first epoch
    they read "epoch 0 of 4" with no time left, however far the epoch was."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_function(_run_in_its_first_epoch, kwargs={"step": 30}).run()
    assert not app.exception, app.exception
    [bar] = app.get("progress")
    assert bar.proto.text == "Running: epoch 1 of 4 (step 30 of 120), about 90 s left"
    assert bar.proto.value == 6  # a quarter of the first of four epochs, in percent
    # Before the trainer's first report of the epoch: the epochs finished, as before.
    app = AppTest.from_function(_run_in_its_first_epoch, kwargs={"step": None}).run()
    assert not app.exception, app.exception
    [bar] = app.get("progress")
    assert (bar.proto.text, bar.proto.value) == ("Running: epoch 0 of 4", 0)


def _status_while_the_api_is_down() -> None:
    import time

    import streamlit as st

    from ui.client import Api
    from ui.views.admin import status_tab

    # The catalog as fetched a minute ago, when a worker served the version.
    st.session_state.setdefault("models_at", time.monotonic())
    st.session_state.setdefault("models_fetched_on", time.time() - 60)
    st.session_state.setdefault(
        "models",
        [
            {
                "ref": "sketch@3",
                "display_name": "Sketches",
                "available": True,
                "workers": 1,
                "reason": None,
                "input": {"mode": "L"},
            }
        ],
    )
    status_tab(Api("http://127.0.0.1:9"), None)  # nothing listens there, so no stats either


def test_the_status_tab_shows_the_models_held_from_before_as_last_known_while_the_api_is_down() -> None:
    """With the API down the held catalog said "Available: yes" under "Portal: not ready", as if
    a worker served the version now; it is said to be the last known, and from when."""
    import re

    from streamlit.testing.v1 import AppTest

    app = AppTest.from_function(_status_while_the_api_is_down).run()
    assert not app.exception, app.exception
    assert [m.value for m in app.metric] == ["not ready"]
    [warning] = [w.value for w in app.warning]
    assert re.fullmatch(
        r"Last known model versions, as of \d\d:\d\d:\d\d UTC \(6\d s ago\): the API cannot be reached now\.", warning
    ), warning
    [table] = [d.value for d in app.dataframe]
    assert list(table["Model version"]) == ["Sketches (sketch@3)"]
