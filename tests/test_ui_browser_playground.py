"""The playground in a real browser: Generate generates once however it is clicked and stays disabled until the
generation has ended (a reload included), the generations stay listed after a reload, and an empty base model that
this offline machine has not downloaded is said once, beside the button, in the form's words.

The server runs on a data folder with the tiny model in DATA/models/tiny, offline, with an empty hub cache (so the
arch's default model is surely missing)."""

from __future__ import annotations

import re
import shutil

import pytest
from uibrowser import UiServer, by, new_page, shot

from zimage_lora.models.arch import ARCHS

PROMPT = "a fox in the snow, generated once"
OFFLINE = (
    f"Base model: {ARCHS['zimage_turbo'].default_model} is not downloaded and this machine is offline; download it "
    "or choose a local folder under models/"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ui-playground")
    data = root / "data"
    shutil.copytree(tiny_model_dir, data / "models" / "tiny")
    with pytest.MonkeyPatch.context() as env:  # the server and its processes: offline, an empty hub cache
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_HOME", str(root / "hf-home"))
        env.setenv("HF_HUB_CACHE", str(root / "hf-home" / "hub"))
        env.setenv("OMP_NUM_THREADS", "1")
        ui = UiServer(data)
    try:
        yield ui.wait_ready()
    finally:
        ui.stop()


def fill(page, model: str, seed: int) -> None:
    page.fill(by("pg-model"), model)
    page.select_option(by("pg-arch"), "zimage_turbo")
    page.fill(by("pg-prompt"), PROMPT)
    for key, value in (("width", "64"), ("height", "64"), ("steps", "1"), ("seed", str(seed))):
        page.fill(by(f"pg-{key}"), value)
    page.select_option(by("pg-device"), "cpu")


def test_generate_once_wait_for_it_across_a_reload_and_find_it_after(browser, server):
    """A double click on Generate queues one generation; the button stays disabled while it runs, also after a
    reload (the page follows the running generation again), and comes back when it is done; after another reload
    the generation is still listed with its prompt, settings and image."""
    from playwright.sync_api import expect

    context, page = new_page(browser)
    try:
        page.goto(f"{server.url}/#/playground")
        expect(page.locator(by("pg-no-results"))).to_be_visible()
        fill(page, "models/tiny", seed=5)
        button = page.locator(by("pg-generate"))
        button.dblclick()
        expect(button).to_be_disabled()
        cards = page.locator(f"{by('pg-results')} > article")
        expect(cards).to_have_count(1)
        listed = server.api("/api/generations")
        assert listed["total"] == 1, listed  # one queued, whatever the second click did
        gen_id = listed["generations"][0]["id"]
        card = page.locator(by(f"gen-{gen_id}"))
        expect(card.locator(by("gen-status"))).to_have_text(re.compile("queued|running"))

        page.reload()  # while it waits or runs: followed again, and Generate still waits for it
        status = card.locator(by("gen-status"))
        expect(status).to_have_text(re.compile("queued|running"))
        expect(button).to_be_disabled()
        expect(status).to_have_text("done", timeout=120_000)
        expect(button).to_be_enabled()
        image = card.locator(by("gen-image"))
        page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image.element_handle())
        assert server.api("/api/generations")["total"] == 1

        page.reload()  # done: still listed, with what made it
        expect(card.locator(by("gen-prompt"))).to_have_text(PROMPT)
        expect(card.locator(by("gen-settings"))).to_contain_text("64×64, 1 step, guidance 1, seed 5, no LoRA")
        expect(card.locator(by("gen-status"))).to_have_text("done")
        page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image.element_handle())
        expect(button).to_be_enabled()
        shot(page, "18-playground-history")
    except BaseException:
        shot(page, "failure-playground-history")
        raise
    assert not page.errors, f"JavaScript errors on the pages: {page.errors}"
    context.close()


def test_an_empty_base_model_offline_is_said_once_beside_generate(browser, server):
    """With the base model left empty the placeholder shows the arch's default, and Generate uses it; offline and
    not downloaded, that is said once, beside the button and in view, naming the form's field (not the job file's
    key); nothing is queued, and Generate can be pressed again."""
    from playwright.sync_api import expect

    before = server.api("/api/generations")["total"]
    context, page = new_page(browser)
    try:
        page.goto(f"{server.url}/#/playground")
        fill(page, "", seed=6)
        model = page.locator(by("pg-model"))
        expect(model).to_have_attribute("placeholder", ARCHS["zimage_turbo"].default_model)
        expect(model).to_have_value("")
        page.click(by("pg-generate"))
        error = page.locator(by("pg-error"))
        expect(error).to_have_text(OFFLINE)
        expect(error).to_be_in_viewport()  # where the click left the page: no scrolling to find it
        expect(page.get_by_text("is not downloaded")).to_have_count(1)  # no toast, no second box
        expect(page.locator("body")).not_to_contain_text("model.name_or_path")
        expect(page.locator(by("toast"))).to_have_count(0)
        button = page.locator(by("pg-generate"))
        expect(button).to_be_enabled()
        beside = page.evaluate(
            """() => {
                const e = document.querySelector('[data-testid="pg-error"]').getBoundingClientRect();
                const b = document.querySelector('[data-testid="pg-generate"]').getBoundingClientRect();
                return e.bottom > b.top && e.top < b.bottom && e.right <= b.left;  // on its row, left of it
            }"""
        )
        assert beside, "the error is not beside the Generate button"
        expect(model).to_have_attribute("aria-invalid", "true")
        shot(page, "19-playground-offline-error")
        assert server.api("/api/generations")["total"] == before
        page.fill(by("pg-model"), "models/tiny")  # fixing the field clears the error
        expect(error).to_be_hidden()
    except BaseException:
        shot(page, "failure-playground-offline")
        raise
    assert not page.errors, f"JavaScript errors on the pages: {page.errors}"
    context.close()
