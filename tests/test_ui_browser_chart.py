"""The job page's loss chart in a real browser, on the shared trained job (``trained_ui``: 8 steps, the preview scores
at the rounds of steps 2, 4, 6 and 8): the values under the pointer, step labels, smoothing, log scale, zoom by the
step inputs and by dragging (the scores chart follows), and the choices kept across a reload.

Screenshot: test-artifacts/ui/32-loss-chart.png (the tooltip at step 5)."""

from __future__ import annotations

from uibrowser import TRAINED_JOB, by, new_page, shot


def tick_x(page, step: int) -> float:
    """The page x of `step` on the loss chart: the middle of its label on the x axis."""
    box = page.locator(f'{by("loss-chart")} text.x-tick[data-step="{step}"]').bounding_box()
    return box["x"] + box["width"] / 2


def test_the_loss_chart_shows_the_value_under_the_pointer_zooms_and_keeps_its_choices(browser, trained_ui):
    from playwright.sync_api import expect

    metrics = trained_ui.api(f"/api/jobs/{TRAINED_JOB}/metrics")["metrics"]
    losses = {row["step"]: row for row in metrics if "loss" in row}
    assert sorted(losses) == list(range(1, 9))
    rounds = [row["step"] for row in metrics if row.get("leak") is not None]
    assert rounds == [2, 4, 6, 8]

    context, page = new_page(browser)
    try:
        page.goto(f"{trained_ui.url}/#/jobs/{TRAINED_JOB}")
        chart = page.locator(f"{by('loss-chart')} svg")
        scores = page.locator(f"{by('scores-chart')} svg")
        expect(chart).to_have_attribute("data-points", "8")
        x_ticks = page.locator(f"{by('loss-chart')} text.x-tick")
        expect(x_ticks).to_have_text([str(step) for step in range(1, 9)])
        expect(page.locator(f"{by('loss-chart')} text.axis-title")).to_have_text(["step", "loss"])
        expect(scores).to_have_attribute("data-x-min", "1")
        expect(scores).to_have_attribute("data-x-max", "8")

        # The pointer over step 5 (a little off it: the crosshair snaps to the nearest logged step).
        box = chart.bounding_box()
        page.mouse.move(tick_x(page, 5) + 0.3 * (tick_x(page, 6) - tick_x(page, 5)), box["y"] + box["height"] / 2)
        tip = page.locator(by("loss-tooltip"))
        expect(tip).to_be_visible()
        expect(tip.locator('[data-key="step"]')).to_have_text("step 5")
        shown = page.evaluate("async (v) => (await import('/static/lib.js')).fmtNumber(v)", losses[5]["loss"])
        expect(tip.locator('[data-key="loss"]')).to_have_text(f"loss{shown}")
        expect(tip.locator('[data-key="lr"]')).to_have_text(f"lr{losses[5]['lr']:.2e}".replace("e-0", "e-"))
        expect(page.locator(f"{by('loss-chart')} .crosshair")).to_have_attribute("visibility", "visible")
        # the same step on the scores chart, whose tooltip gives the nearest preview round
        expect(page.locator(f"{by('scores-chart')} .crosshair")).to_have_attribute("visibility", "visible")
        expect(page.locator(by("scores-tooltip")).locator('[data-key="step"]')).to_have_text("preview round at step 4")
        assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")  # the tooltips stay on the page
        shot(page, "32-loss-chart")

        # The keyboard moves the crosshair too.
        chart.focus()
        page.keyboard.press("ArrowRight")
        expect(tip.locator('[data-key="step"]')).to_have_text("step 6")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        expect(tip.locator('[data-key="step"]')).to_have_text("step 4")

        # Log scale and no smoothing: the smoothed path is the raw one.
        page.check(by("loss-log"))
        expect(chart).to_have_attribute("data-log", "true")
        expect(page.locator(f"{by('loss-chart')} text.axis-title")).to_have_text(["step", "loss (log)"])
        page.locator(by("loss-smoothing")).fill("0")
        raw = page.locator(f"{by('loss-chart')} path.raw")
        expect(page.locator(f"{by('loss-chart')} path.smooth")).to_have_attribute("d", raw.get_attribute("d"))
        assert raw.get_attribute("d").count("L") == 7  # all 8 points, none thinned out

        # Zoom by the step inputs: a backwards range is refused with a reason, then both charts span steps 2..6.
        page.fill(by("loss-zoom-from"), "6")
        page.fill(by("loss-zoom-to"), "2")
        page.press(by("loss-zoom-to"), "Enter")
        expect(page.locator(by("loss-zoom-error"))).to_have_text(
            "Zoom: the first step (6) must be below the last (2); change one of them."
        )
        page.fill(by("loss-zoom-from"), "2")
        page.press(by("loss-zoom-from"), "Enter")
        page.fill(by("loss-zoom-to"), "6")
        page.press(by("loss-zoom-to"), "Enter")
        expect(chart).to_have_attribute("data-x-max", "6")
        expect(chart).to_have_attribute("data-x-min", "2")
        expect(chart).to_have_attribute("data-shown", "5")
        expect(x_ticks).to_have_text(["2", "3", "4", "5", "6"])
        expect(scores).to_have_attribute("data-x-min", "2")
        expect(scores).to_have_attribute("data-x-max", "6")

        # Zoom by dragging across the chart (steps 3 to 5 of the 2..6 view).
        box = chart.bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(tick_x(page, 3), y)
        page.mouse.down()
        page.mouse.move(tick_x(page, 4), y)
        page.mouse.move(tick_x(page, 5), y)
        page.mouse.up()
        expect(chart).to_have_attribute("data-x-min", "3")
        expect(chart).to_have_attribute("data-x-max", "5")
        expect(page.locator(by("loss-zoom-from"))).to_have_value("3")
        expect(scores).to_have_attribute("data-x-max", "5")

        page.click(by("loss-zoom-reset"))
        expect(chart).to_have_attribute("data-x-min", "1")
        expect(chart).to_have_attribute("data-x-max", "8")
        expect(x_ticks).to_have_text([str(step) for step in range(1, 9)])
        expect(scores).to_have_attribute("data-x-max", "8")
        expect(page.locator(by("loss-zoom-reset"))).to_be_disabled()

        # The choices are this job's, remembered by the browser.
        page.reload()
        expect(page.locator(by("loss-log"))).to_be_checked()
        expect(page.locator(f"{by('loss-chart')} svg")).to_have_attribute("data-log", "true")
        expect(page.locator(by("loss-smoothing"))).to_have_value("0")
        assert page.errors == []
    finally:
        context.close()
