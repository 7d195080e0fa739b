"""The dataset page in a real browser (issue 21): image cards that hold together from a phone-wide window to 2560 px
and at 200% zoom, with a long file name; a caption uploaded without its image, named and deleted from the page; and
the dataset check's problems grouped by kind, the fatal one first, no trigger check when no trigger word is entered.

Only datasets: no model is needed. Screenshot: test-artifacts/ui/20-dataset-page.png (1400 px wide)."""

from __future__ import annotations

import pytest
from conftest import demo_dataset
from uibrowser import DEMO, UiServer, by, new_page, shot

LONG = "red_fox_portrait_in_the_autumn_forest_at_golden_hour_v02.png"  # 60 characters
PICTURES = sorted(e.name for e in DEMO.iterdir() if e.name.lower().endswith((".png", ".jpg")))
# (CSS width, device pixels per CSS pixel): 640 CSS px at 2 is a 1280-px window at 200% zoom
VIEWPORTS = [(512, 1), (1024, 1), (1400, 1), (1920, 1), (2560, 1), (640, 2)]

# For one card: where its Delete button and caption box lie against the card, and whether anything scrolls sideways.
MEASURE = """(card) => {
  const box = card.getBoundingClientRect();
  const inside = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.left >= box.left - 0.5 && r.right <= box.right + 0.5
      && r.top >= box.top - 0.5 && r.bottom <= box.bottom + 0.5;
  };
  const button = card.querySelector('[data-testid^="delete-image-"]');
  const caption = card.querySelector('textarea');
  const name = card.querySelector('.file-name');
  return {
    button: inside(button), caption: inside(caption), name: inside(name), title: name.title,
    text: button.textContent, clipped: button.scrollWidth > button.clientWidth,
    scrolls: [card, ...card.querySelectorAll('*')]
      .filter((el) => el.scrollWidth > el.clientWidth && getComputedStyle(el).overflowX !== 'visible')
      .filter((el) => el !== name && !el.matches('.sr-only')) // the name ellipsizes; a screen reader's label
      .map((el) => el.className || el.tagName),
    overflows: card.scrollWidth > card.clientWidth,
  };
}"""


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The UI on a fresh data folder with three datasets: `layout` (the demo pictures, each captioned, one more
    under a 60-character name), `orphans` (two pictures) and `check` (the demo pictures captioned without the
    trigger)."""
    data = tmp_path_factory.mktemp("uidatasets") / "data"
    layout = demo_dataset(data / "datasets" / "layout")
    (layout / "fox_06.txt").write_text("[trigger], a cartoon fox head on a purple wall")
    (layout / LONG).write_bytes((layout / "fox_01.png").read_bytes())
    (layout / LONG.replace(".png", ".txt")).write_text("[trigger], the same fox under a very long file name")
    demo_dataset(data / "datasets" / "orphans", 2)
    check = data / "datasets" / "check"
    check.mkdir()
    for name in PICTURES:
        (check / name).write_bytes((DEMO / name).read_bytes())
        (check / name).with_suffix(".txt").write_text("a cartoon fox head")
    server = UiServer(data).wait_ready()
    try:
        yield server
    finally:
        server.stop()


def test_image_cards_hold_their_buttons_and_captions_at_every_width(browser, ui):
    from playwright.sync_api import expect

    files = sorted([*PICTURES, LONG])
    assert len(LONG) == 60
    pages = {}  # one page per pixel scale, resized and reloaded for each width
    for width, scale in VIEWPORTS:
        where = f"{width} CSS px at {scale}x"
        if scale not in pages:
            pages[scale] = new_page(browser, width, 900, device_scale_factor=scale)
        page = pages[scale][1]
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(f"{ui.url}/#/datasets/layout")
        page.reload()  # nothing armed from the last width
        cards = page.locator('[data-testid^="image-card-"]')
        expect(cards).to_have_count(len(files))
        if width == 1400:
            shot(page, "20-dataset-page")
        before = dict(zip(files, cards.evaluate_all(f"cards => cards.map({MEASURE})"), strict=True))
        for file in files:
            normal = before[file]
            assert normal["text"] == "Delete" and normal["title"] == file, (where, file, normal)
            page.click(by(f"delete-image-{file}"))  # once: armed, it asks for a second click
            armed = page.locator(by(f"image-card-{file}")).evaluate(MEASURE)  # at once: it disarms after 4 s
            assert armed["text"] == "Click again to delete", (where, file, armed)
            for state in (normal, armed):
                assert state["button"] and state["caption"] and state["name"], (where, file, state)
                assert not state["clipped"] and not state["overflows"] and not state["scrolls"], (where, file, state)
    for context, page in pages.values():
        assert not page.errors, page.errors
        context.close()
    assert len(list((ui.data / "datasets" / "layout").iterdir())) == 2 * len(files)  # one click deletes nothing


def test_a_caption_uploaded_alone_is_named_listed_and_deleted(browser, ui, tmp_path):
    from playwright.sync_api import expect

    folder = ui.data / "datasets" / "orphans"
    lonely = tmp_path / "fox_09.txt"
    lonely.write_text("[trigger], a cartoon fox head at night")
    context, page = new_page(browser, 1280, 900)
    page.goto(f"{ui.url}/#/datasets/orphans")
    expect(page.locator('[data-testid^="image-card-"]')).to_have_count(2)
    expect(page.locator(by("orphan-captions"))).to_be_hidden()

    page.set_input_files(by("upload-input"), [str(lonely)])
    result = page.locator(by("upload-result"))
    expect(result).to_contain_text("Saved 1 file, but a caption has no image:")
    expect(page.locator(by("upload-orphans"))).to_have_text(
        "fox_09.txt has no image fox_09.*; upload the image too or delete the caption"
    )
    row = page.locator(by("orphan-caption-fox_09.txt"))
    expect(page.locator(by("orphan-captions"))).to_contain_text("Orphan captions (1)")
    expect(row).to_contain_text("a cartoon fox head at night")
    assert (folder / "fox_09.txt").is_file()  # kept: its image may come next

    page.click(by("delete-orphan-fox_09.txt"))
    expect(page.locator(by("delete-orphan-fox_09.txt"))).to_have_text("Click again to delete")
    assert (folder / "fox_09.txt").is_file()
    page.click(by("delete-orphan-fox_09.txt"))
    expect(row).to_have_count(0)
    expect(page.locator(by("orphan-captions"))).to_be_hidden()
    assert not (folder / "fox_09.txt").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["fox_01.png", "fox_01.txt", "fox_02.png", "fox_02.txt"]
    assert not page.errors, page.errors
    context.close()


def test_the_check_groups_problems_by_kind_with_the_fatal_one_first(browser, ui):
    from playwright.sync_api import expect

    context, page = new_page(browser, 1280, 900)
    page.goto(f"{ui.url}/#/datasets/check")
    expect(page.locator('[data-testid^="image-card-"]')).to_have_count(len(PICTURES))
    problems = page.locator(by("check-problems"))

    # Too small for 1024, no trigger word entered: one group, each file once, no trigger check at all.
    page.fill(by("check-resolutions"), "64,1024")
    page.click(by("check-dataset"))
    small = page.locator(by("check-group-too_small-1024"))
    expect(small.locator("h3")).to_have_text(f"Warning Too small for 1024 px ({len(PICTURES)})")
    expect(page.locator('[data-kind="without_trigger"]')).to_have_count(0)
    expect(page.locator('[data-kind="cannot_train"]')).to_have_count(0)
    expect(small).not_to_have_attribute("role", "alert")
    files = page.locator(by("check-files-too_small-1024"))
    shown = files.inner_text()
    assert f"… and {len(PICTURES) - 6} more" in shown and sum(shown.count(n) for n in PICTURES) == 6, shown
    page.click(by("check-more-too_small-1024"))
    expect(page.locator(by("check-more-too_small-1024"))).to_have_attribute("aria-expanded", "true")
    listed = problems.inner_text()  # what the page shows: the printed report stays folded
    assert all(listed.count(name) == 1 for name in PICTURES), listed
    expect(page.locator(by("check-report"))).to_be_hidden()
    expect(page.locator(by("check-full-report"))).not_to_have_attribute("open", "")
    expect(page.locator(by("check-summary"))).to_have_text(
        f"{len(PICTURES)} of {len(PICTURES)} images can train at one of the resolutions. Problems by kind:"
    )

    # With a trigger word, captions without it are a kind of their own.
    page.fill(by("check-trigger"), "zfox")
    page.click(by("check-dataset"))
    trigger = page.locator('[data-kind="without_trigger"]')
    expect(trigger.locator("h3")).to_have_text(
        f"Warning Captions without the trigger ('zfox' or [trigger]) ({len(PICTURES)})"
    )

    # Nothing fills 512, 768 or 1024: the fatal problem first, as an error (role=alert), the warnings after.
    page.fill(by("check-resolutions"), "512,768,1024")
    page.fill(by("check-trigger"), "")
    page.click(by("check-dataset"))
    groups = problems.locator(".check-group")
    expect(groups.first).to_have_attribute("data-kind", "cannot_train")
    expect(groups.first).to_have_attribute("role", "alert")
    expect(groups.first).to_have_class("check-group check-fatal")
    expect(groups.first).to_contain_text("Error Cannot train")
    expect(groups.first).to_contain_text("lower them to")
    expect(groups).to_have_count(2)
    expect(groups.nth(1)).to_have_class("check-group check-warning")
    expect(groups.nth(1).locator("h3")).to_have_text(f"Warning Too small for 512, 768 and 1024 px ({len(PICTURES)})")
    colors = groups.evaluate_all("els => els.map((el) => getComputedStyle(el).backgroundColor)")
    assert colors[0] != colors[1], colors  # the error does not look like the warnings
    assert not page.errors, page.errors
    context.close()
