"""The job form as a new user meets it (issue 21): before any dataset exists, what a wrong entry says, warnings that
never refuse, the adapter's "Another file", and a sticky Create bar that neither hides the fields nor hides under
the toasts. One UI server on a fresh data folder (no model needed: the form checks the hub's names offline)."""

from __future__ import annotations

import shutil

import pytest
from uibrowser import DEMO, TIMEOUT_MS, UiServer, by, new_page, shot

from zimage_lora.models.devices import cuda_count


@pytest.fixture(scope="module")
def empty_ui(tmp_path_factory):
    data = tmp_path_factory.mktemp("ui-form") / "data"
    data.mkdir()
    ui = UiServer(data).wait_ready()
    try:
        yield ui
    finally:
        ui.stop()


def _boxes(page, *testids: str) -> list[dict]:
    return [page.locator(by(t)).bounding_box() for t in testids]


def _overlap(a: dict, b: dict) -> bool:
    return not (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


def test_the_new_job_form_speaks_the_fields_terms(browser, empty_ui):
    from playwright.sync_api import expect

    server = empty_ui
    context, page = new_page(browser, 1280, 800)
    page.goto(f"{server.url}/#/jobs/new")

    # No dataset yet: the form says to create one, never "no images in <the data folder>".
    error = page.locator(by("error-datasets[0].path"))
    expect(error).to_have_text(  # the server's first check loads the schema and the arch registry: allow for it
        "no dataset chosen; there is none yet: create one on the Datasets page", timeout=TIMEOUT_MS
    )
    expect(page.locator("body")).not_to_contain_text("no images")
    # The device picker offers what this machine has (no GPU here: auto and cpu), nothing it lacks.
    gpus = [f"cuda:{index}" for index in range(cuda_count())]
    expect(page.locator(f"{by('field-job.device')} label")).to_have_text(["auto", "cpu", *gpus])

    server.api("/api/datasets", "POST", {"name": "fox"})
    shutil.copy(DEMO / "fox_01.png", server.data / "datasets" / "fox" / "fox_01.png")
    page.reload()
    page.select_option(by("dataset-select-0"), "fox")
    for side in ("512", "768", "1024"):  # no resolution left: what to do, not "needs at least 1 item, got 0"
        page.uncheck(by(f"dataset-res-0-{side}"))
    expect(page.locator(by("error-datasets[0].resolutions"))).to_have_text("Add at least one resolution.")
    page.fill(by("dataset-res-extra-0"), "128")  # the one picture is 128 px
    status = page.locator(by("validation-status"))
    expect(status).to_have_text("✓ Valid")

    # A cleared number box and an emptied list: what to do, in the field's words; no schema talk.
    rank = page.locator(by("field-target.rank"))
    rank.fill("")
    expect(page.locator(by("error-target.rank"))).to_have_text("Type a whole number here (it is empty).")
    rank.press_sequentially("2e")  # not a number yet: the browser reports no value; the form says what to type
    expect(page.locator(by("error-target.rank"))).to_have_text(
        "Type a number here: digits, a point, or a form like 1e-4."
    )
    rank.fill("16")
    expect(status).to_have_text("✓ Valid")
    page.fill(by("field-train.lr"), "-1")
    expect(page.locator(by("error-train.lr"))).to_have_text("Must be more than 0 (you entered -1).")
    page.fill(by("field-train.lr"), "0.0001")
    expect(page.locator("body")).not_to_contain_text("needs at least")
    expect(page.locator("body")).not_to_contain_text("got null")
    expect(status).to_have_text("✓ Valid")

    # Longer than the run: warned under each field, never refused.
    page.fill(by("field-train.steps"), "100")
    page.fill(by("field-train.warmup_steps"), "200")
    page.fill(by("field-save.every"), "500")
    expect(page.locator(by("warning-train.warmup_steps"))).to_contain_text("longer than the run (100 steps)")
    expect(page.locator(by("warning-save.every"))).to_contain_text("longer than the run (100 steps)")
    expect(status).to_have_text("✓ Valid")

    # "Another file" for the adapter: the published adapter's hub path leaves the field.
    adapter = page.locator(by("field-model.training_adapter"))
    expect(adapter).to_have_value("ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors")
    page.select_option(by("adapter-version"), "")
    expect(adapter).to_have_value("")
    expect(adapter).to_be_focused()
    expect(page.locator(by("error-model.training_adapter"))).to_be_visible()

    # The sticky bar: a field reached by Tab is not under it; an error toast is not over its buttons.
    bar = page.locator(".sticky-actions")
    for testid in ("field-train.steps", "field-save.every", "field-sample.every"):
        page.locator(by(testid)).focus()
        (field,) = _boxes(page, testid)
        assert field["y"] + field["height"] <= bar.bounding_box()["y"], f"{testid} is under the Create bar"
    page.click(by("create-job"))  # the adapter is missing: refused, with a toast
    toast = page.locator(by("toast")).last
    expect(toast).to_be_visible()
    for button in ("create-job", "create-start-job"):
        assert not _overlap(toast.bounding_box(), page.locator(by(button)).bounding_box()), f"a toast covers {button}"
    shot(page, "40-job-form-messages")
    assert server.api("/api/jobs")["jobs"] == []
    assert not page.errors, page.errors
    context.close()
