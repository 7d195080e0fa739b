"""The sample viewer in a real browser, on the shared trained job (``trained_ui``: 8 steps, two prompts previewed at
steps 0, 2, 4, 6 and 8, the second at LoRA weight 0.8): a click on a preview opens it large with the settings its PNG
holds, the arrow keys step through checkpoints and prompts (and reach a preview that arrives while it is open), a second
checkpoint shows beside it, Esc closes it.

Screenshots: test-artifacts/ui/30-job-page.png (the finished job's page) and 31-sample-viewer.png."""

from __future__ import annotations

import re

from PIL import Image
from uibrowser import ARTIFACTS, TIMEOUT_MS, TRAINED_JOB, by, new_page, shot


def png_text(trained_ui, sample: dict) -> dict:
    """The text chunks of a preview as the trainer wrote them, read from its file in the job's run folder."""
    path = trained_ui.data / "jobs" / TRAINED_JOB / "samples" / sample["url"].rsplit("/", 1)[1]
    with Image.open(path) as image:
        return dict(image.info)


def test_the_sample_viewer_shows_a_previews_settings_and_steps_through_checkpoints(browser, trained_ui):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)  # as test_ui_browser: the live page waits on the server's events
    samples = {(s["step"], s["index"]): s for s in trained_ui.api(f"/api/jobs/{TRAINED_JOB}/samples")["samples"]}
    assert set(samples) == {(step, index) for step in (0, 2, 4, 6, 8) for index in (0, 1)}
    first, second = png_text(trained_ui, samples[(4, 0)]), png_text(trained_ui, samples[(2, 1)])
    assert "[trigger]" not in first["prompt"] and "zfox" in first["prompt"]  # what the PNG holds: the word put in
    meta = samples[(4, 0)]["meta"]  # the API reads the same chunks
    assert (meta["prompt"], meta["seed"], meta["steps"]) == (first["prompt"], int(first["seed"]), int(first["steps"]))
    assert (meta["guidance"], meta["lora_scale"], meta["training_step"]) == (1.5, 1.0, 4)

    context, page = new_page(browser)
    try:
        page.goto(f"{trained_ui.url}/#/jobs/{TRAINED_JOB}")
        expect(page.locator(by("job-status"))).to_have_text("done")
        images = page.locator(by("sample-image"))
        expect(images).to_have_count(10)
        page.locator(by("samples")).scroll_into_view_if_needed()
        page.wait_for_function(
            "[...document.querySelectorAll('[data-testid=sample-image], [data-testid=contact-sheet-image]')]"
            ".every((img) => img.complete && img.naturalWidth > 0)"
        )
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, "30-job-page")

        page.locator(by("sample-group-4")).locator(by("sample-image")).first.click()
        viewer = page.locator(by("sample-viewer"))
        expect(viewer).to_be_visible()
        expect(viewer).to_have_attribute("role", "dialog")
        expect(viewer).to_have_attribute("aria-modal", "true")
        expect(page.locator(by("viewer-prompt"))).to_have_text(first["prompt"])
        expect(page.locator(by("viewer-seed"))).to_have_text(first["seed"])
        expect(page.locator(by("viewer-steps"))).to_have_text("2")
        expect(page.locator(by("viewer-guidance"))).to_have_text("1.5")
        expect(page.locator(by("viewer-lora-scale"))).to_have_text("1")
        expect(page.locator(by("viewer-step"))).to_have_text("4 of 8")
        expect(page.locator(by("viewer-image"))).to_have_attribute("src", samples[(4, 0)]["url"])

        page.keyboard.press("ArrowRight")
        expect(page.locator(by("viewer-step"))).to_have_text("6 of 8")
        expect(page.locator(by("viewer-image"))).to_have_attribute("src", samples[(6, 0)]["url"])
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        expect(page.locator(by("viewer-step"))).to_have_text("2 of 8")
        expect(page.locator(by("viewer-prompt"))).to_have_text(first["prompt"])

        page.keyboard.press("ArrowDown")  # the second prompt at the same step
        expect(page.locator(by("viewer-prompt"))).to_have_text(second["prompt"])
        expect(page.locator(by("viewer-lora-scale"))).to_have_text("0.8")
        expect(page.locator(by("viewer-step"))).to_have_text("2 of 8")
        expect(page.locator(by("viewer-image"))).to_have_attribute("src", samples[(2, 1)]["url"])
        expect(page.locator(by("viewer-next-prompt"))).to_be_disabled()  # the last prompt: the ends stop
        expect(page.locator(by("viewer-prev-prompt"))).to_be_enabled()

        page.locator(by("viewer-compare-step")).select_option("8")
        expect(page.locator(by("viewer-compare-image"))).to_have_attribute("src", samples[(8, 1)]["url"])
        expect(page.locator(by("viewer-compare-caption"))).to_have_text("Step 8")
        expect(page.locator(by("viewer-image-caption"))).to_have_text("Step 2")
        page.wait_for_function(
            "[...document.querySelectorAll('[data-testid=viewer-image], [data-testid=viewer-compare-image]')]"
            ".every((img) => img.complete && img.naturalWidth > 0)"
        )
        boxes = [page.locator(by(t)).bounding_box() for t in ("viewer-image", "viewer-compare-image")]
        assert boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"]  # side by side
        assert boxes[0]["width"] > 128  # large: beyond the job page's thumbnails
        page.screenshot(path=str(ARTIFACTS / "31-sample-viewer.png"))  # the window, as the user sees the dialog

        page.locator(by("viewer-stage")).focus()
        page.keyboard.press("ArrowRight")  # the arrows still step the main image; the compared one stays
        expect(page.locator(by("viewer-image-caption"))).to_have_text("Step 4")
        expect(page.locator(by("viewer-compare-caption"))).to_have_text("Step 8")

        page.keyboard.press("Escape")
        expect(viewer).to_have_count(0)
        expect(page.locator(by("sample-link-4-0"))).to_be_focused()  # back on the preview that opened it

        # The focus stays in the dialog; the Close button and a click beside the dialog close it too.
        page.locator(by("sample-link-8-1")).click()
        expect(page.locator(by("viewer-step"))).to_have_text("8 of 8")
        expect(page.locator(by("viewer-next-step"))).to_be_disabled()
        expect(page.locator(by("viewer-close"))).to_be_focused()
        page.keyboard.press("Shift+Tab")
        expect(page.locator(by("viewer-open-file"))).to_be_focused()
        page.keyboard.press("Tab")
        expect(page.locator(by("viewer-close"))).to_be_focused()
        page.locator(by("viewer-close")).click()
        expect(viewer).to_have_count(0)
        page.locator(by("sample-link-0-0")).click()
        expect(page.locator(by("viewer-prev-step"))).to_be_disabled()
        page.mouse.click(5, 5)
        expect(viewer).to_have_count(0)
        assert re.search(rf"#/jobs/{TRAINED_JOB}$", page.url)  # a plain click opened the viewer, not the file

        # A checkpoint's preview that arrives while the viewer is open is one arrow away (the page's live list):
        # the step-8 preview of prompt 0 is set aside, then put back as the trainer would write it.
        latest = trained_ui.data / "jobs" / TRAINED_JOB / "samples" / samples[(8, 0)]["url"].rsplit("/", 1)[1]
        aside = latest.with_name("set-aside.png.tmp")
        latest.rename(aside)
        try:
            expect(page.locator(by("sample-link-8-0"))).to_have_count(0)
            page.locator(by("sample-link-6-0")).click()
            expect(page.locator(by("viewer-step"))).to_have_text("6 of 8")
            expect(page.locator(by("viewer-next-step"))).to_be_disabled()
        finally:
            aside.rename(latest)
        expect(page.locator(by("viewer-next-step"))).to_be_enabled()
        page.keyboard.press("ArrowRight")
        expect(page.locator(by("viewer-step"))).to_have_text("8 of 8")
        expect(page.locator(by("viewer-image"))).to_have_attribute("src", samples[(8, 0)]["url"])
        page.keyboard.press("Escape")
        expect(viewer).to_have_count(0)

        assert page.errors == []
    except BaseException:
        shot(page, "failure-viewer")
        raise
    finally:
        context.close()
