"""The web UI in a real browser: headless Chromium (Debian's package) driven by Playwright, against the real server.

A fresh data folder holds a tiny model of the real classes; the test then does what a person does: creates a dataset
and uploads images with captions (file picker and drag and drop), edits a caption inline, fills the job panels,
checks validation and the YAML round trip, creates and starts the job, presses "Save now" while it trains, watches
the live page reach the last step with samples and checkpoints, downloads the LoRA and reads it, clones and deletes a
job, and generates in the playground with the trained LoRA. A second server with a token checks the sign-in page.

Screenshots of every page go to test-artifacts/ui/. Without Playwright or /usr/bin/chromium the tests skip, unless
ZIMAGE_LORA_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import base64
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli, wait_for
from uibrowser import DEMO, TIMEOUT_MS, UiServer, by, new_page, shot

UPLOADS = ["fox_01.png", "fox_01.txt", "fox_02.png", "fox_02.txt", "fox_03.png", "fox_03.txt", "fox_04.JPG"]
STEPS = 30
DEVICES = "cpu,cuda:0,cuda:1"


# --- the server, as a user starts it ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The UI on a fresh data folder with a tiny model in DATA/models/tiny (and a tiny training adapter beside the
    data folder: a local file that a user types in). Its trainers stop after step 2 and after their final files
    until the test lets them go (``wait`` faults), so what the test clicks lands at a known step on any machine. It
    offers two GPUs besides the CPU (``DEVICES``), whatever this machine has; the jobs it trains use the CPU."""
    data = tmp_path_factory.mktemp("ui") / "data"
    (data / "models").mkdir(parents=True)
    ui = UiServer(data, fault="wait@step:2,wait@finished", devices=DEVICES)  # it starts while the model is written
    try:
        made = run_cli("tiny-model", data / "models" / "tiny")
        assert made.returncode == 0, made.stderr
        adapter = data.parent / "adapter" / "tiny_adapter.safetensors"
        made = run_cli("tiny-adapter", data / "models" / "tiny", adapter, "--seed", "1")
        assert made.returncode == 0, made.stderr
        ui.wait_ready()
        yield ui
    finally:
        ui.stop()


# --- the whole story ---------------------------------------------------------------------------------------------


def test_train_a_lora_in_the_browser(browser, server, tmp_path):
    from playwright.sync_api import expect

    context, page = new_page(browser, accept_downloads=True)
    expect.set_options(timeout=TIMEOUT_MS)

    try:
        dataset = make_dataset(page, server, server.data)
        fill_new_job(page, server, server.data, dataset)
        train_and_watch(page, server, server.data)
        download_lora(page, tmp_path)
        clone_edit_and_delete(page, server)
        generate_in_playground(page, server)
    except BaseException:
        shot(page, "failure")  # what the page showed when the test gave up
        raise

    # Without EventSource the job page falls back to polling and shows the same.
    polling = context.new_page()
    polling.add_init_script("delete window.EventSource")
    polling.goto(f"{server.url}/#/jobs/fox")
    expect(polling.locator(by("live-state"))).to_have_text("polling")
    expect(polling.locator(by("job-step"))).to_have_text(f"{STEPS} / {STEPS}")
    expect(polling.locator(by("checkpoint-fox.safetensors"))).to_be_visible()
    expect(polling.locator(by(f"sample-group-{STEPS}"))).to_be_visible()
    polling.close()

    page.goto(f"{server.url}/#/jobs")
    expect(page.locator(by("job-status-fox"))).to_have_text("done")
    expect(page.locator(by("job-step-fox"))).to_have_text(f"{STEPS} / {STEPS}")
    shot(page, "01-jobs")
    assert not page.errors, f"JavaScript errors on the pages: {page.errors}"
    context.close()


def make_dataset(page, server: UiServer, data: Path) -> str:
    from playwright.sync_api import expect

    page.goto(f"{server.url}/#/datasets")
    page.fill(by("new-dataset-name"), "foxes")
    page.click(by("create-dataset"))
    expect(page).to_have_url(re.compile(r"#/datasets/foxes$"))

    # Many files at once through the file picker: images and the .txt captions that pair with them by name.
    folder = data.parent / "uploads"
    folder.mkdir(exist_ok=True)
    for name in UPLOADS + ["fox_05.png"]:
        (folder / name).write_bytes((DEMO / name).read_bytes())
    page.set_input_files(by("upload-input"), [str(folder / name) for name in UPLOADS])
    expect(page.locator(by("upload-result"))).to_contain_text("Saved 7 files")
    cards = page.locator('[data-testid^="image-card-"]')
    expect(cards).to_have_count(4)
    expect(page.locator(by("caption-fox_02.png"))).to_have_value((DEMO / "fox_02.txt").read_text().strip())
    expect(page.locator(by("image-card-fox_04.jpg"))).to_be_visible()  # the extension is lower-cased

    # Drag and drop one more image onto the drop zone, then delete it again (two clicks).
    payload = base64.b64encode((folder / "fox_05.png").read_bytes()).decode()
    page.evaluate(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: 'image/png' }));
            const zone = document.querySelector('[data-testid="drop-zone"]');
            zone.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        ["fox_05.png", payload],
    )
    expect(cards).to_have_count(5)
    assert (data / "datasets" / "foxes" / "fox_05.png").is_file()
    page.click(by("delete-image-fox_05.png"))
    page.click(by("delete-image-fox_05.png"))
    expect(cards).to_have_count(4)
    assert not (data / "datasets" / "foxes" / "fox_05.png").exists()

    # Inline caption edit: Enter saves, the card says so, the .txt on disk has it.
    caption = page.locator(by("caption-fox_01.png"))
    caption.fill("[trigger], a cartoon fox head, edited in the browser")
    expect(page.locator(by("caption-status-fox_01.png"))).to_have_text("unsaved")
    caption.press("Enter")
    expect(page.locator(by("caption-status-fox_01.png"))).to_have_text("✓ saved")
    txt = data / "datasets" / "foxes" / "fox_01.txt"
    assert txt.read_text(encoding="utf-8").strip() == "[trigger], a cartoon fox head, edited in the browser"
    # A caption for the uncaptioned jpg, saved on blur.
    page.locator(by("caption-fox_04.jpg")).fill("[trigger], a cartoon fox head, photo")
    page.locator(by("caption-fox_03.png")).click()
    expect(page.locator(by("caption-status-fox_04.jpg"))).to_have_text("✓ saved")
    assert (data / "datasets" / "foxes" / "fox_04.txt").read_text(encoding="utf-8").strip().endswith("photo")

    # The dataset check report.
    page.fill(by("check-resolutions"), "64")
    page.fill(by("check-trigger"), "zfox")
    page.click(by("check-dataset"))
    expect(page.locator(by("check-report"))).to_contain_text("4")
    expect(page.locator(by("dataset-count"))).to_have_text("4 images, 4 captioned")
    shot(page, "05-dataset")

    page.click(by("nav-datasets"))
    expect(page.locator(by("dataset-row-foxes"))).to_contain_text("4 / 4")
    shot(page, "04-datasets")
    return "foxes"


def fill_new_job(page, server: UiServer, data: Path, dataset: str) -> None:
    from playwright.sync_api import expect

    page.click(by("nav-jobs"))
    page.click(by("new-job"))
    expect(page).to_have_url(re.compile(r"#/jobs/new$"))
    for panel in ("JOB", "MODEL", "QUANTIZATION", "TARGET", "SAVE", "TRAINING", "DATASETS", "SAMPLE", "ADVANCED"):
        expect(page.locator(by(f"panel-{panel}"))).to_be_visible()
    panel_order = page.locator('[data-testid^="panel-"]').evaluate_all("els => els.map(e => e.dataset.testid)")
    assert panel_order == [f"panel-{p}" for p in ("JOB", "MODEL", "QUANTIZATION", "TARGET", "SAVE", "TRAINING")] + [
        f"panel-{p}" for p in ("DATASETS", "SAMPLE", "ADVANCED")
    ]
    # Help text comes from the schema's descriptions.
    expect(page.locator(by("panel-TARGET"))).to_contain_text("Rank of the low-rank update")

    field = lambda key: page.locator(by(f"field-{key}"))  # noqa: E731
    field("job.name").fill("fox")
    field("job.trigger_word").fill("zfox")
    page.check(by("device-cpu"))

    # The architecture decides the adapter choice and the preview steps and guidance.
    field("model.arch").select_option("zimage_deturbo")
    expect(field("model.training_adapter")).to_be_hidden()
    expect(field("sample.steps")).to_have_value("25")
    expect(field("sample.guidance")).to_have_value("3")
    field("model.arch").select_option("zimage_turbo_adapter")
    expect(field("model.training_adapter")).to_be_visible()
    expect(field("model.training_adapter")).to_have_value(re.compile(r"_v2\.safetensors$"))
    v1 = page.locator(f"{by('adapter-version')} option", has_text="v1")
    expect(v1).to_have_text(re.compile(r"^v1: the safe baseline: go back to it when training with v2 is unstable"))
    page.select_option(by("adapter-version"), v1.get_attribute("value"))
    expect(field("model.training_adapter")).to_have_value(re.compile(r"_v1\.safetensors$"))
    expect(field("sample.steps")).to_have_value("8")

    field("model.name_or_path").fill("models/tiny")
    adapter = data.parent / "adapter" / "tiny_adapter.safetensors"
    field("model.training_adapter").fill(str(adapter))
    expect(page.locator(by("adapter-version"))).to_have_value("")
    field("target.rank").fill("4")
    field("save.every").fill("1000")
    field("save.dtype").select_option("fp32")
    field("train.steps").fill(str(STEPS))
    field("train.grad_accum").fill("2")
    field("train.optimizer").select_option("adamw")
    field("train.lr").fill("0.001")
    field("train.gradient_checkpointing").uncheck()
    field("train.cache_text_embeddings").check()

    # Validation as the user types: an error appears beside the field it names, and goes away when fixed.
    field("train.lr").fill("0")
    expect(page.locator(by("error-train.lr"))).to_have_text("Must be more than 0 (you entered 0).")
    expect(page.locator(by("validation-status"))).to_have_text("1 problem")
    field("train.lr").fill("0.001")
    expect(page.locator(by("error-train.lr"))).to_be_hidden()

    page.select_option(by("dataset-select-0"), dataset)
    page.fill(by("dataset-dropout-0"), "0")
    # the fox pictures (120-176 px) cannot train at the presets' 512/768/1024: the resolutions say so at once
    expect(page.locator(by("error-datasets[0].resolutions"))).to_contain_text("no image is large enough")
    for res in (512, 768, 1024):
        page.uncheck(by(f"dataset-res-0-{res}"))
    page.fill(by("dataset-res-extra-0"), "64")
    expect(page.locator(by("error-datasets[0].resolutions"))).to_be_hidden()

    field("sample.every").fill("10")
    field("sample.width").fill("64")
    field("sample.height").fill("64")
    field("sample.steps").fill("2")
    while page.locator(by("remove-prompt-1")).count():
        page.click(by("remove-prompt-1"))
    page.fill(by("prompt-0"), "[trigger], a cartoon fox head on a blue sky")
    page.click(by("add-prompt"))  # one without the trigger: its change is the run's leak score
    page.fill(by("prompt-1"), "a red car on a street")
    expect(page.locator(by("validation-status"))).to_have_text("✓ Valid")
    # valid, with a warning (the guide's advice) beside a field that is allowed but unwise: it never blocks
    expect(page.locator(by("warning-train.lr"))).to_contain_text("the guide warns that 0.0002 and above")
    shot(page, "02-new-job-panels")

    # The YAML tab edits the same job: a change there comes back to the form, a syntax error is shown.
    page.click(by("tab-yaml"))
    yaml_box = page.locator(by("job-yaml"))
    expect(yaml_box).to_have_value(re.compile(r"\n  rank: 4\n"))
    text = yaml_box.input_value()
    assert "trigger_word: zfox" in text and f"steps: {STEPS}" in text and "resolutions: [64]" in text, text
    shot(page, "03-new-job-yaml")
    yaml_box.fill(text + "\ntrain: [")
    expect(page.locator(by("yaml-errors"))).to_contain_text("syntax error")
    yaml_box.fill(text.replace("trigger_word: zfox", "trigger_word: zfoxy"))
    expect(page.locator(by("validation-status"))).to_have_text("✓ Valid")
    page.click(by("tab-form"))
    expect(field("job.trigger_word")).to_have_value("zfoxy")
    expect(field("target.rank")).to_have_value("4")
    field("job.trigger_word").fill("zfox")
    expect(page.locator(by("validation-status"))).to_have_text("✓ Valid")

    page.click(by("create-job"))
    expect(page).to_have_url(re.compile(r"#/jobs/fox$"))
    expect(page.locator(by("job-status"))).to_have_text("draft")
    job_yaml = (data / "jobs" / "fox" / "job.yaml").read_text() if (data / "jobs" / "fox" / "job.yaml").exists() else ""
    saved = server.api("/api/jobs/fox")["config"]
    assert saved["target"]["rank"] == 4 and saved["train"]["steps"] == STEPS, job_yaml
    assert saved["datasets"][0]["resolutions"] == [64] and saved["datasets"][0]["path"] == f"datasets/{dataset}"
    assert saved["sample"]["prompts"] == ["[trigger], a cartoon fox head on a blue sky", "a red car on a street"]


def train_and_watch(page, server: UiServer, data: Path) -> None:
    from playwright.sync_api import expect

    requests = data / "jobs" / "fox" / "requests"

    def ask_save_and_sample() -> None:
        page.click(by("btn-save"))
        page.click(by("btn-sample"))
        wait_for(lambda: (requests / "save").exists() and (requests / "sample").exists(), what="both request files")

    page.click(by("btn-start"))
    expect(page.locator(by("job-status"))).to_have_text(re.compile("queued|running"))
    expect(page.locator(by("live-state"))).to_have_text("live")
    # Save now and Sample now while the trainer is held after step 2: both act at step 2, whatever the speed.
    server.wait_for_hold("step-2")
    ask_save_and_sample()
    shot(page, "06-job-running")
    server.release("step-2")
    checkpoint_rows = page.locator(f'{by("checkpoints")} tr[data-final="false"]')
    expect(checkpoint_rows.first).to_have_attribute("data-step", "2", timeout=60_000)
    assert (data / "jobs" / "fox" / f"fox_{2:09d}.safetensors").is_file()  # no schedule asked for step 2
    expect(page.locator(by("sample-group-2"))).to_be_visible(timeout=60_000)

    # After the last step: the final files are written, the process has not ended yet. The requests are answered
    # at once, pointing at the final LoRA, and none is left behind for a later --resume.
    server.wait_for_hold("finished")
    page.click(by("btn-save"))
    expect(page.locator(by("toast")).last).to_contain_text(
        "job 'fox' has finished: nothing to save any more; its final LoRA is jobs/fox/fox.safetensors"
    )
    page.click(by("btn-sample"))
    expect(page.locator(by("toast")).last).to_contain_text("nothing to sample any more")
    server.release("finished")
    expect(page.locator(by("job-status"))).to_have_text("done", timeout=120_000)
    assert not any(requests.iterdir())
    log = page.locator(by("job-log"))

    step = page.locator(by("job-step"))
    expect(step).to_have_text(f"{STEPS} / {STEPS}")
    expect(page.locator(by("job-progress"))).to_have_attribute("aria-valuenow", str(STEPS))
    # Samples grouped by step (0, 2 on request, 10, 20 and the end), the contact sheet, the final LoRA, the loss
    # curve, the log.
    expect(page.locator(by(f"sample-group-{STEPS}"))).to_be_visible()
    expect(page.locator(by("sample-group-10"))).to_be_visible()
    first_sample = page.locator(by("sample-image")).first
    expect(first_sample).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=first_sample.element_handle())
    expect(page.locator(by("contact-sheet-image"))).to_be_visible()
    expect(page.locator(by("checkpoint-fox.safetensors"))).to_be_visible()
    expect(page.locator(f"{by('loss-chart')} svg")).to_have_attribute("data-points", str(STEPS))
    # the preview scores beside the loss: rounds at steps 2 (requested), 10, 20 and 30; per-prompt values on hover
    expect(page.locator(f"{by('scores-chart')} svg")).to_have_attribute("data-points", "4")
    dot = page.locator(f'{by("scores-chart")} circle[data-score="leak"][data-step="{STEPS}"]')
    expect(dot.locator("title")).to_have_text(
        re.compile(rf"^step {STEPS}: change on prompts without the trigger \d\.\d+ \(prompt 1: \d\.\d+\)$")
    )
    expect(log).to_contain_text("request: save at step 2")
    expect(log).to_contain_text("request: sample at step 2")
    expect(page.locator(by("btn-save"))).to_be_hidden()
    shot(page, "07-job-done")


def download_lora(page, tmp_path: Path) -> None:
    from zimage_lora.lora.io import read_lora

    with page.expect_download() as info:
        page.click(by("download-fox.safetensors"))
    download = info.value
    assert download.suggested_filename == "fox.safetensors"
    target = tmp_path / "downloaded.safetensors"
    download.save_as(str(target))
    lora = read_lora(target)
    assert lora.layout == "zimage-lora" and lora.modules
    assert {weights.rank for weights in lora.modules.values()} == {4}


def clone_edit_and_delete(page, server: UiServer) -> None:
    from playwright.sync_api import expect

    # The copy opens in the new-job form and exists only once created: leaving the form leaves no stray job.
    page.click(by("btn-clone"))
    expect(page).to_have_url(re.compile(r"#/jobs/new\?from=job%3Afox$"))
    expect(page.locator(by("field-job.name"))).to_have_value("fox-copy")
    expect(page.locator(by("field-target.rank"))).to_have_value("4")
    page.click(by("nav-jobs"))
    expect(page.locator(by("job-row-fox"))).to_be_visible()
    assert [j["name"] for j in server.api("/api/jobs")["jobs"]] == ["fox"]
    page.goto(f"{server.url}/#/jobs/fox")
    page.click(by("btn-clone"))
    expect(page.locator(by("field-job.name"))).to_have_value("fox-copy")
    page.fill(by("field-target.rank"), "8")
    expect(page.locator(by("validation-status"))).to_have_text("✓ Valid")
    page.click(by("create-job"))
    expect(page).to_have_url(re.compile(r"#/jobs/fox-copy$"))
    expect(page.locator(by("job-status"))).to_have_text("draft")
    assert server.api("/api/jobs/fox-copy")["config"]["target"]["rank"] == 8
    page.click(by("btn-delete"))
    ok = page.locator(by("confirm-ok"))
    page.fill(by("confirm-name"), "fox")
    expect(ok).to_be_disabled()
    page.fill(by("confirm-name"), "fox-copy")
    expect(page.locator(by("confirm-echo"))).to_contain_text('"fox-copy" matches')
    expect(ok).to_be_enabled()
    ok.click()
    expect(page).to_have_url(re.compile(r"#/jobs$"))
    expect(page.locator(by("job-row-fox-copy"))).to_have_count(0)
    assert [j["name"] for j in server.api("/api/jobs")["jobs"]] == ["fox"]


def generate_in_playground(page, server: UiServer) -> None:
    from playwright.sync_api import expect

    page.goto(f"{server.url}/#/playground")
    page.click(by("pg-add-lora"))
    final = next(lora for lora in server.api("/api/loras")["loras"] if lora["job"] == "fox" and lora["final"])
    page.select_option(by("pg-lora-0"), final["path"])
    expect(page.locator(by("pg-lora-weight-value-0"))).to_have_text("0.80")
    page.locator(by("pg-lora-weight-0")).fill("1.2")
    expect(page.locator(by("pg-lora-weight-value-0"))).to_have_text("1.20")
    page.fill(by("pg-model"), "models/tiny")
    # the playground offers the archs LoRAs are used with: this one, trained with the adapter, runs on Turbo
    expect(page.locator(f'{by("pg-arch")} option[value="zimage_turbo_adapter"]')).to_have_count(0)
    page.select_option(by("pg-arch"), "zimage_turbo")
    page.fill(by("pg-prompt"), "zfox, a cartoon fox head")
    for key, value in (("width", "64"), ("height", "64"), ("steps", "2"), ("seed", "3")):
        page.fill(by(f"pg-{key}"), value)
    page.select_option(by("pg-device"), "cpu")
    expect(page.locator(by("pg-fuse"))).to_be_checked()  # LoRAs fused by default, compile off
    expect(page.locator(by("pg-compile"))).not_to_be_checked()
    page.select_option(by("pg-quantize"), "int8")
    page.click(by("pg-generate"))
    status = page.locator(by("gen-status")).first
    expect(status).to_have_text(re.compile("queued|running|done"))
    expect(status).to_have_text("done", timeout=120_000)
    image = page.locator(by("gen-image")).first
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image.element_handle())
    expect(page.locator(by("pg-results"))).to_contain_text("int8 weights")
    shot(page, "08-playground")


# --- the device picker ------------------------------------------------------------------------------------------


def _editing(browser, server, job: str, dataset: str):
    """A job from the turbo-adapter-v2 preset on the CPU, with a one-image dataset, open in the job editor:
    (its config, the browser context, the page)."""
    config = next(p["config"] for p in server.api("/api/presets")["presets"] if p["name"] == "turbo-adapter-v2")
    config["job"].update(name=job, device="cpu")
    config["datasets"] = [{**config["datasets"][0], "path": f"datasets/{dataset}", "resolutions": [128]}]
    server.api("/api/datasets", "POST", {"name": dataset})
    shutil.copy(DEMO / "fox_01.png", server.data / "datasets" / dataset / "fox_01.png")  # 128 px
    server.api("/api/jobs", "POST", {"config": config})
    context, page = new_page(browser)
    page.goto(f"{server.url}/#/jobs/{job}/edit")
    return config, context, page


def test_the_device_picker_offers_the_machines_devices(browser, server):
    """The job form's device field lists what the server says the machine has (here DEVICES); two GPUs ticked save a
    list; a job's device the machine lacks is shown, ticked and marked, and starting it is refused beside the field."""
    from playwright.sync_api import expect

    config, context, page = _editing(browser, server, "gpus", "devs")
    picker = page.locator(by("field-job.device"))
    expect(picker.locator("label")).to_have_text(["auto", "cpu", "cuda:0", "cuda:1"])
    expect(page.locator(by("device-cpu"))).to_be_checked()
    page.check(by("device-cuda:0"))
    page.check(by("device-cuda:1"))
    expect(page.locator(by("device-cpu"))).not_to_be_checked()
    expect(page.locator(by("validation-status"))).to_have_text("✓ Valid")
    page.click(by("save-job"))
    expect(page.locator(by("job-device"))).to_have_text("cuda:0, cuda:1")
    assert server.api("/api/jobs/gpus")["config"]["job"]["device"] == ["cuda:0", "cuda:1"]

    server.api("/api/jobs/gpus", "PUT", {"config": {**config, "job": {**config["job"], "device": "cuda:7"}}})
    page.goto(f"{server.url}/#/jobs/gpus/edit")
    expect(page.locator(by("device-cuda:7"))).to_be_checked()
    missing = "cuda:7 is not on this machine (it has cpu, cuda:0, cuda:1)"
    expect(page.locator(by("device-missing"))).to_have_text(missing)
    expect(page.locator(by("error-job.device"))).to_have_text(f"{missing}; choose one of those")  # as it opens
    expect(page.locator(by("validation-status"))).not_to_have_text("✓ Valid")
    page.click(by("save-start-job"))
    expect(page.locator(by("error-job.device"))).to_have_text(f"{missing}; choose one of those")
    assert server.api("/api/jobs/gpus")["status"] == "draft"
    shot(page, "10-device-picker")
    page.check(by("device-cuda:1"))  # the missing GPU stays listed; picking one the machine has clears the mark
    page.uncheck(by("device-cuda:7"))
    expect(page.locator(by("device-missing"))).to_be_hidden()
    context.close()


def test_a_datasets_more_options_reach_the_saved_job(browser, server):
    """AI Toolkit's per-dataset options (issue 17) are in the form: folded under "More options", each with its help;
    what is set there is saved in the job."""
    from playwright.sync_api import expect

    _, context, page = _editing(browser, server, "more", "more")
    more = page.locator(by("dataset-more-0"))
    expect(more).not_to_have_attribute("open", "")
    more.locator("summary").click()
    expect(more).to_contain_text("AI Toolkit's network_weight")  # the schema's help under the field
    page.fill(by("dataset-network_weight-0"), "0.5")
    page.check(by("dataset-flip_x-0"))
    page.fill(by("dataset-keep_tokens-0"), "1")
    expect(page.locator(by("validation-status"))).to_have_text("✓ Valid")
    page.click(by("save-job"))
    expect(page.locator(by("job-device"))).to_have_text("cpu")
    saved = server.api("/api/jobs/more")["config"]["datasets"][0]
    assert (saved["network_weight"], saved["flip_x"], saved["keep_tokens"], saved["flip_y"]) == (0.5, True, 1, False)
    page.goto(f"{server.url}/#/jobs/more/edit")
    expect(page.locator(by("dataset-more-0"))).to_have_attribute("open", "")  # open when the dataset sets one
    context.close()


# --- the token ------------------------------------------------------------------------------------------------------


def test_token_login(browser, tmp_path):
    from playwright.sync_api import expect

    data = tmp_path / "data"
    (data / "datasets").mkdir(parents=True)
    ui = UiServer(data, token="secret").wait_ready()
    try:
        # Something for the job page to show: a dataset with one image and a draft job (made through the API).
        ui.api("/api/datasets", "POST", {"name": "one"})
        shutil.copy(DEMO / "fox_01.png", data / "datasets" / "one" / "fox_01.png")
        presets = ui.api("/api/presets")["presets"]
        config = next(p["config"] for p in presets if p["name"] == "turbo-adapter-v2")
        config["job"]["name"] = "guarded"
        config["job"]["device"] = "cpu"
        config["datasets"][0]["path"] = "datasets/one"
        config["datasets"][0]["resolutions"] = [128]  # the one picture is 128 px
        ui.api("/api/jobs", "POST", {"config": config})

        context, page = new_page(browser, 1100, 760)
        page.goto(f"{ui.url}/#/jobs")
        expect(page).to_have_url(re.compile(r"/login"))
        page.fill(by("login-token"), "wrong")
        page.click(by("login-submit"))
        expect(page.locator(by("login-error"))).to_be_visible()
        shot(page, "09-login")
        assert not context.cookies()

        page.fill(by("login-token"), "secret")
        page.click(by("login-submit"))
        expect(page.locator(by("job-row-guarded"))).to_be_visible()
        cookie = next(c for c in context.cookies() if c["name"] == "zl_token")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # The live stream works with the cookie: the page goes live, and a status change arrives without a reload.
        page.click(by("job-link-guarded"))
        expect(page.locator(by("job-status"))).to_have_text("draft")
        expect(page.locator(by("live-state"))).to_have_text("live")
        page.evaluate("window.__same_page = true")
        ui.api("/api/jobs/guarded/start", "POST")  # the hub model is not there offline: the job fails
        expect(page.locator(by("job-status"))).to_have_text("failed", timeout=90_000)
        expect(page.locator(by("job-error"))).to_be_visible()
        assert page.evaluate("window.__same_page") is True

        # The failure: the trainer's own error sentence first and on its own; how it ended and the log folded below.
        job = ui.api("/api/jobs/guarded")
        headline = job["error"].split("\n")[0]
        assert f"error: {headline}" in job["log_tail"] and "ended before finishing" not in headline
        expect(page.locator(by("job-error-headline"))).to_have_text(headline)
        expect(page.locator(by("job-error-log"))).to_be_hidden()
        page.locator(f"{by('job-error')} summary").click()
        expect(page.locator(by("job-error-log"))).to_contain_text("the trainer ended before finishing (exit code 2)")
        # Nothing was saved: Start over is offered, Resume is not.
        assert job["resumable"] is False
        expect(page.locator(by("btn-resume"))).to_be_hidden()
        expect(page.locator(by("btn-start"))).to_have_text("Start over")
        shot(page, "09b-failed-job")
        page.click(by("nav-jobs"))  # the list too: Start over, no Resume
        expect(page.locator(by("job-start-guarded"))).to_have_text("Start over")
        expect(page.locator(by("job-resume-guarded"))).to_have_count(0)

        # Sign out: back to the sign-in page, and the session the cookie named is gone for good.
        old = next(c["value"] for c in context.cookies() if c["name"] == "zl_token")
        page.click(by("sign-out"))
        expect(page).to_have_url(re.compile(r"/login$"))
        assert not [c for c in context.cookies() if c["name"] == "zl_token"]
        request = urllib.request.Request(f"{ui.url}/api/jobs", headers={"Cookie": f"zl_token={old}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        context.close()
    finally:
        ui.stop()


# --- issue 18: importing an AI Toolkit job, comparisons ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_server(tmp_path_factory, tiny_model_dir, tiny_adapter):
    """The UI on a data folder with the tiny model, the demo fox pictures and two training adapters in DATA/models;
    the second variant of a comparison of the job ``cmp`` stops after its step 1 until the test lets it go (a
    ``wait`` fault on its job name: every other trainer runs freely)."""
    from conftest import demo_dataset

    from zimage_lora.models.tiny_adapter import write_random_adapter

    data = tmp_path_factory.mktemp("ui-compare") / "data"
    shutil.copytree(tiny_model_dir, data / "models" / "tiny")
    shutil.copy(tiny_adapter, data / "models" / "adapter_a.safetensors")
    write_random_adapter(tiny_model_dir, data / "models" / "adapter_b.safetensors", rank=4, seed=2)
    demo_dataset(data / "datasets" / "fox", 3)
    ui = UiServer(data, fault="wait@step:1#cmp_v1").wait_ready()
    try:
        yield ui
    finally:
        ui.stop()


def test_compare_two_adapters_stop_resume_and_see_them_side_by_side(browser, compare_server):
    """From a job's page: Compare, two adapter files as the values; the comparison's page follows it while the first
    variant trains; Stop while the second is held after its step 1 (it saves there); Resume; the grid shows both
    variants' previews at the last checkpoint, and each variant's loss curve."""
    from playwright.sync_api import expect
    from test_ui_api import job_config

    server = compare_server
    adapters = ["models/adapter_a.safetensors", "models/adapter_b.safetensors"]
    override = {
        "train": {"steps": 4},
        "save": {"every": 2, "keep": 4},
        "sample": {"every": 2, "steps": 1, "prompts": ["[trigger] head", "a red car"]},
    }
    server.api("/api/jobs", "POST", {"config": job_config("cmp", adapters[0], override)})
    context, page = new_page(browser)
    try:
        page.goto(f"{server.url}/#/jobs/cmp")
        page.click(by("btn-compare"))
        expect(page.locator(by("cmp-setting"))).to_have_value("model.training_adapter")
        expect(page.locator(by("cmp-value-0"))).to_have_value(re.compile(r"_v1\.safetensors$"))  # the published ones
        expect(page.locator(by("cmp-value-1"))).to_have_value(re.compile(r"_v2\.safetensors$"))
        page.fill(by("cmp-value-0"), "models/nothing.safetensors")
        page.fill(by("cmp-value-1"), adapters[1])
        page.click(by("cmp-submit"))
        expect(page.locator(by("cmp-error"))).to_contain_text("values.0: model.training_adapter=models/nothing")
        page.fill(by("cmp-value-0"), adapters[0])
        shot(page, "11-compare-dialog")
        page.click(by("cmp-submit"))
        expect(page).to_have_url(re.compile(r"#/comparisons/[0-9a-f]+$"))
        expect(page.locator(by("cmp-job"))).to_have_text("cmp")

        server.wait_for_hold("step-1")  # the first variant is done, the second holds after its step 1
        expect(page.locator(by("cmp-status"))).to_have_text("running")
        expect(page.locator(by("cmp-variant-status-0"))).to_have_text("done")
        expect(page.locator(by("cmp-variant-status-1"))).to_have_text("running")
        expect(page.locator(by("cmp-progress"))).to_have_text(re.compile("^Training variant 2 of 2"))
        expect(page.locator(f"{by('cmp-cell-0-0')} img")).to_be_visible()  # the first variant's last previews
        shot(page, "12-comparison-running")
        page.click(by("cmp-stop"))
        expect(page.locator(by("cmp-status"))).to_have_text("stopping")
        server.release("step-1")  # the trainer reaches its step's end and saves
        expect(page.locator(by("cmp-status"))).to_have_text("stopped", timeout=60_000)
        expect(page.locator(by("cmp-variant-status-1"))).to_have_text("stopped")

        page.click(by("cmp-resume"))
        expect(page.locator(by("cmp-status"))).to_have_text("done", timeout=120_000)
        grid = page.locator(by("cmp-grid"))
        expect(grid).to_have_attribute("data-step", "4")  # the last checkpoint, both variants side by side
        for row in (0, 1):
            for column in (0, 1):
                image = page.locator(f"{by(f'cmp-cell-{row}-{column}')} img")
                expect(image).to_be_visible()
                page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image.element_handle())
        expect(page.locator(by("cmp-column-1"))).to_contain_text("adapter_b.safetensors")
        page.select_option(by("cmp-step"), "2")
        expect(grid).to_have_attribute("data-step", "2")
        expect(page.locator(f"{by('cmp-cell-0-1')} img")).to_be_visible()  # resumed from step 1: step 2 is there
        for variant in (0, 1):
            expect(page.locator(f"{by(f'cmp-loss-{variant}')} svg")).to_have_attribute("data-points", "4")
        expect(page.locator(by("cmp-summary"))).to_be_visible()
        shot(page, "13-comparison-done")

        page.click(by("cmp-job"))
        expect(page.locator(f'{by("job-comparisons")} [data-testid^="cmp-status-"]')).to_have_text("done")
    except BaseException:
        shot(page, "failure-compare")
        raise
    assert not page.errors, f"JavaScript errors on the pages: {page.errors}"
    context.close()


AI_TOOLKIT_JOB = """job: extension
config:
  name: fox lora
  process:
    - type: diffusion_trainer
      training_folder: /home/me/ai-toolkit/output
      device: cpu
      trigger_word: zfox
      network: {type: lora, linear: 8, linear_alpha: 8}
      datasets:
        - {folder_path: /home/me/ai-toolkit/datasets/fox, resolution: [64]}
      train: {batch_size: 1, steps: 2000, optimizer: adamw8bit, lr: 0.0001}
      model:
        name_or_path: Tongyi-MAI/Z-Image-Turbo
        arch: zimage:turbo
        assistant_lora_path: ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors
      sample: {sample_every: 250, width: 1024, height: 1024, prompts: [zfox], sample_steps: 9, fancy: 3}
"""


def test_import_an_ai_toolkit_job_into_the_new_job_form(browser, compare_server, tmp_path):
    """The file lands in the form as a preset does; the findings are listed by kind; its dataset folder, outside the
    data folder, stays as written and is marked; choosing the data folder's dataset makes the job valid."""
    from playwright.sync_api import expect

    job_file = tmp_path / "fox lora.yaml"
    job_file.write_text(AI_TOOLKIT_JOB)
    context, page = new_page(browser)
    page.goto(f"{compare_server.url}/#/jobs/new")
    expect(page.locator(by("validation-status"))).to_have_text(re.compile("Valid|problem"))
    page.set_input_files(by("import-file"), str(job_file))
    findings = page.locator(by("import-findings"))
    expect(findings).to_contain_text("Imported from fox lora.yaml")
    converted = page.locator(by("import-group-converted"))
    expect(converted).to_have_attribute("open", "")
    expect(converted).to_contain_text("config.process[0].sample.sample_steps")
    expect(page.locator(by("import-group-not-mapped"))).to_contain_text("config.process[0].sample.fancy")
    expect(page.locator(by("import-group-mapped"))).not_to_have_attribute("open", "")
    expect(page.locator(by("start-from"))).to_have_value("import")
    expect(page.locator(by("field-job.name"))).to_have_value("fox_lora")
    expect(page.locator(by("field-target.rank"))).to_have_value("8")
    expect(page.locator(by("error-datasets[0].path"))).to_contain_text("/home/me/ai-toolkit/datasets/fox")
    shot(page, "14-import-ai-toolkit")
    page.select_option(by("dataset-select-0"), "fox")
    expect(page.locator(by("validation-status"))).to_have_text("✓ Valid")

    page.set_input_files(by("import-file"), {"name": "notes.txt.yaml", "mimeType": "text/yaml", "buffer": b"a: [b"})
    expect(page.locator(by("import-error"))).to_contain_text("notes.txt.yaml: not a YAML or JSON file")
    expect(page.locator(by("field-job.name"))).to_have_value("fox_lora")  # a refused file changes nothing
    context.close()


# --- issue 19: LoRAs from other trainers in the playground -----------------------------------------------------------


def test_upload_an_outside_lora_in_the_playground_and_generate_with_it(browser, server, tmp_path):
    """A LoRA another trainer wrote (musubi's kohya layout, bf16) uploaded from the playground: it is saved in the data
    folder, chosen, described by inspect for the base model (with what ComfyUI would drop), and generates; a file
    that is no LoRA is refused in one sentence."""
    from playwright.sync_api import expect

    from zimage_lora.lora.formats import transformer_names
    from zimage_lora.lora.tools import convert_lora
    from zimage_lora.models.tiny_adapter import write_random_adapter

    model = server.data / "models" / "tiny"
    ours = write_random_adapter(model, tmp_path / "ours.safetensors", rank=4, seed=5)
    lora = tmp_path / "fox-style kohya.safetensors"
    convert_lora(ours, lora, "kohya", "bf16", transformer_names(model))
    context, page = new_page(browser)
    try:
        page.goto(f"{server.url}/#/playground")
        page.fill(by("pg-model"), "models/tiny")  # the upload is checked against the chosen base model
        page.set_input_files(by("pg-lora-upload"), str(lora))
        saved = page.locator(by("pg-upload-result"))
        # the UI's first inspect imports torch and diffusers: seconds on a busy machine
        expect(saved).to_contain_text("Saved loras/fox-style_kohya.safetensors", timeout=60_000)
        expect(page.locator(by("pg-lora-0"))).to_have_value("loras/fox-style_kohya.safetensors")
        summary = "kohya / musubi-tuner, 28 modules, rank 4, no trigger word recorded"
        expect(page.locator(by("pg-lora-summary-0"))).to_have_text(summary)
        expect(page.locator(by("pg-lora-warnings-0"))).to_contain_text("ComfyUI drops 48 of its keys")
        expect(page.locator(f'{by("pg-lora-0")} optgroup[label="Uploaded"] option')).to_have_count(1)

        junk = {"name": "notes.safetensors", "mimeType": "application/octet-stream", "buffer": b"not a LoRA"}
        page.set_input_files(by("pg-lora-upload"), junk)
        rejected = page.locator(by("pg-upload-rejected"))
        expect(rejected).to_contain_text("notes.safetensors: notes.safetensors is not a readable .safetensors file")
        expect(page.locator(by("pg-lora-1"))).to_have_count(0)  # nothing was added
        assert not (server.data / "loras" / "notes.safetensors").exists()

        page.select_option(by("pg-arch"), "zimage_turbo")
        page.fill(by("pg-prompt"), "a fox in the style")
        for key, value in (("width", "64"), ("height", "64"), ("steps", "1"), ("seed", "4")):
            page.fill(by(f"pg-{key}"), value)
        page.select_option(by("pg-device"), "cpu")
        shot(page, "15-playground-outside-lora")
        page.click(by("pg-generate"))
        status = page.locator(by("gen-status")).first
        expect(status).to_have_text("done", timeout=120_000)
        image = page.locator(by("gen-image")).first
        page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image.element_handle())
        expect(page.locator(by("pg-results"))).to_contain_text("fox-style_kohya.safetensors @ 0.8")
    except BaseException:
        shot(page, "failure-outside-lora")
        raise
    assert not page.errors, f"JavaScript errors on the pages: {page.errors}"
    context.close()


# --- issue 20: captioning a dataset with a model ---------------------------------------------------------------------


def test_caption_a_dataset_edit_a_proposal_reject_one_and_accept(browser, server):
    """The dataset page's Caption card: a run of the tiny random captioner on the CPU, its three proposals beside
    their thumbnails (the captioned image shows its caption and is not selected), one edited, one rejected, "Accept
    selected": only the edited caption is written, and the page's caption of that image shows it."""
    from conftest import demo_dataset
    from playwright.sync_api import expect

    from zimage_lora.models.tiny_captioner import build_tiny_qwen3_vl

    build_tiny_qwen3_vl(server.data / "models" / "captioner")
    pets = demo_dataset(server.data / "datasets" / "capfox", 3)
    (pets / "fox_02.txt").unlink()
    (pets / "fox_03.txt").unlink()
    existing = (pets / "fox_01.txt").read_text()
    context, page = new_page(browser)
    try:
        page.goto(f"{server.url}/#/datasets/capfox")
        page.fill(by("cap-model"), "models/captioner")
        page.fill(by("cap-trigger"), "zfox")
        page.fill(by("cap-max-words"), "8")  # a random model says as much as it may: fewer words, a shorter test
        page.select_option(by("cap-device"), "cpu")  # the server offers GPUs this machine lacks
        page.click(by("cap-submit"))
        expect(page.locator(by("cap-status"))).to_have_text("done", timeout=120_000)
        expect(page.locator(f"{by('cap-proposals')} figure")).to_have_count(3)
        expect(page.locator(by("cap-existing-fox_01.png"))).to_have_text(f"Now: {existing}")
        expect(page.locator(by("cap-select-fox_01.png"))).not_to_be_checked()
        count = re.compile(r"^2 / 2 images · [0-9.]+ images/s$")  # fox_01 has a caption: not captioned
        expect(page.locator(by("cap-count"))).to_have_text(count)
        edited = "zfox, a fox edited in the browser"
        page.fill(by("cap-text-fox_02.png"), edited)
        expect(page.locator(by("cap-select-fox_02.png"))).to_be_checked()
        page.fill(by("cap-text-fox_03.png"), "zfox, not wanted")
        page.click(by("cap-reject-fox_03.png"))
        expect(page.locator(by("cap-select-fox_03.png"))).not_to_be_checked()
        shot(page, "16-caption-proposals")
        page.click(by("cap-accept-selected"))
        expect(page.locator(by("cap-state-fox_02.png"))).to_have_text("✓ written")
        expect(page.locator(by("caption-fox_02.png"))).to_have_value(edited)  # the dataset's grid shows it
        assert (pets / "fox_02.txt").read_text() == edited
        assert not (pets / "fox_03.txt").exists()
        assert (pets / "fox_01.txt").read_text() == existing
        shot(page, "17-caption-accepted")
    except BaseException:
        shot(page, "failure-caption")
        raise
    assert not page.errors, f"JavaScript errors on the pages: {page.errors}"
    context.close()
