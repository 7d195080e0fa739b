"""Issue 18 in the web UI's API: an AI Toolkit job file imported into the new-job form, and comparisons (the job
trained once per value of one setting, ``zimage-lora compare`` run by the UI's queue) on the tiny model: queued,
stopped while its second variant trains, resumed without training the first one again, and done with its grids."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from conftest import wait_for, wait_status_of
from test_ui_api import data_dir, end_processes, job_config, open_client  # noqa: F401 - data_dir: a fixture

from zimage_lora.models.tiny_adapter import write_random_adapter


@pytest.fixture
def client(data_dir):  # noqa: F811 - data_dir is the fixture imported above
    with open_client(data_dir) as c:
        try:
            yield c
        finally:
            end_processes(c)


# --- importing an AI Toolkit job -------------------------------------------------------------------------------------

AI_TOOLKIT_JOB = """
job: extension
config:
  name: fox lora
  process:
    - type: diffusion_trainer
      training_folder: /home/me/ai-toolkit/output
      device: cpu
      trigger_word: zfox
      network: {type: lora, linear: 8, linear_alpha: 8}
      save: {dtype: bf16, save_every: 250, max_step_saves_to_keep: 4}
      datasets:
        - folder_path: FOLDER
          caption_ext: txt
          resolution: [64]
      train: {batch_size: 1, steps: 2000, optimizer: adamw8bit, lr: 0.0001}
      model:
        name_or_path: Tongyi-MAI/Z-Image-Turbo
        arch: zimage:turbo
        assistant_lora_path: ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors
      sample: {sample_every: 250, width: 1024, height: 1024, prompts: [zfox, a fox], sample_steps: 9, fancy: 3}
"""


def test_an_ai_toolkit_job_lands_in_the_new_job_form_with_its_findings(client, data_dir):  # noqa: F811
    """The import answers the form's config (as a preset fills it: output in jobs, paths in the data folder relative
    to it) and every key's finding; a dataset folder outside the data folder stays as written, with its error."""
    inside = AI_TOOLKIT_JOB.replace("FOLDER", str(data_dir / "datasets" / "fox"))
    body = client.post("/api/jobs/import", json={"text": inside, "filename": "fox.yaml"}).json()
    config = body["config"]
    assert body["errors"] == []
    assert config["job"]["name"] == "fox_lora" and config["job"]["output_dir"] == "jobs"
    assert config["datasets"][0]["path"] == "datasets/fox" and config["datasets"][0]["resolutions"] == [64]
    assert config["target"]["rank"] == 8
    assert config["sample"]["steps"] is None  # Turbo's 9 counted one step more: 8, the arch's own, which it follows
    assert config["model"]["training_adapter"].endswith("_v2.safetensors")
    kinds = {f["path"]: f["kind"] for f in body["findings"]}
    assert kinds["config.process[0].sample.sample_steps"] == "converted"
    assert kinds["config.process[0].sample.fancy"] == "not mapped"
    assert kinds["config.process[0].train.lr"] == "mapped"
    assert client.post("/api/config/validate", json={"config": config}).json()["ok"]  # what the form checks next

    outside = client.post("/api/jobs/import", json={"text": AI_TOOLKIT_JOB.replace("FOLDER", "/home/me/fox")}).json()
    assert outside["config"]["datasets"][0]["path"] == "/home/me/fox"
    assert outside["config"]["job"]["output_dir"] == "jobs"
    assert [e["key"] for e in outside["errors"]] == ["datasets[0].path"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("job: [unclosed", "fox.yaml: not a YAML or JSON file"),
        ("version: 1\njob: {name: x}\n", "is a zimage-lora job already"),
        (AI_TOOLKIT_JOB.replace("zimage:turbo", "flux"), "not a Z-Image model"),
    ],
)
def test_a_file_that_is_no_ai_toolkit_job_is_refused_in_one_sentence(client, text, words):
    refused = client.post("/api/jobs/import", json={"text": text, "filename": "fox.yaml"})
    assert refused.status_code == 422 and refused.json()["field"] == "text"
    assert words in refused.json()["error"] and "\n" not in refused.json()["error"]


# --- comparisons ------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_adapters(data_dir, tiny_model_dir, tiny_adapter):  # noqa: F811
    """Two training adapters in DATA/models, as a user puts them there: ``a`` (the fixture's) and ``b``."""
    models = data_dir / "models"
    shutil.copy(tiny_adapter, models / "adapter_a.safetensors")
    write_random_adapter(tiny_model_dir, models / "adapter_b.safetensors", rank=4, seed=2)
    return ["models/adapter_a.safetensors", "models/adapter_b.safetensors"]


def small_job(client, name: str, adapter: str) -> None:
    override = {
        "model": {"training_adapter": adapter},
        "train": {"steps": 4},
        "save": {"every": 2, "keep": 4},
        "sample": {"every": 2, "steps": 1, "prompts": ["[trigger] head", "a red car"]},
    }
    created = client.post("/api/jobs", json={"config": job_config(name, adapter, override)})
    assert created.status_code == 201, created.json()


def wait_comparison(client, cmp_id: str, *statuses: str, timeout: float = 120) -> dict:
    path = f"/api/comparisons/{cmp_id}"
    return wait_status_of(lambda: client.get(path).json(), f"comparison {cmp_id}", statuses, timeout)


def test_a_comparison_stops_resumes_without_retraining_and_draws_its_grids(
    client,
    data_dir,  # noqa: F811 - the fixture
    two_adapters,
    tmp_path,
    monkeypatch,
):
    """Two adapters compared on the tiny model (64 px, 4 steps, previews and saves every 2): the second variant is
    held after its step 1 (a ``wait`` fault on its job name) while the comparison is stopped; it saves there, the
    comparison ends ``stopped``; resumed, it goes on from that checkpoint and the first variant is not trained
    again."""
    holds = tmp_path / "holds"
    holds.mkdir()
    monkeypatch.setenv("ZIMAGE_LORA_FAULT", "wait@step:1#duo_v1")  # the processes the runner starts see it
    monkeypatch.setenv("ZIMAGE_LORA_FAULT_DIR", str(holds))
    small_job(client, "duo", two_adapters[0])
    created = client.post("/api/jobs/duo/compare", json={"setting": "model.training_adapter", "values": two_adapters})
    assert created.status_code == 201, created.json()
    cmp_id = created.json()["id"]
    assert created.json()["status"] in ("queued", "running")
    folder = data_dir / "comparisons" / cmp_id
    snapshot = (folder / "job.yaml").read_text()
    assert "name: duo\n" in snapshot  # the job file as it was: a later edit of the job does not change it
    row = client.app.state.ui.store.get("comparisons", cmp_id)
    assert row["varies"] == [f"model.training_adapter={data_dir / v}" for v in two_adapters]  # absolute, as in a job
    offered = client.get("/api/models/files").json()["files"]  # what the Compare dialog offers for an adapter
    assert [f["path"] for f in offered] == two_adapters
    listed = client.get("/api/comparisons?job=duo").json()["comparisons"]
    assert [(c["id"], c["setting"], c["values"]) for c in listed] == [(cmp_id, "model.training_adapter", two_adapters)]

    wait_for(lambda: (holds / "held-step-1").exists(), what="the second variant held after its step 1")
    first = folder / "duo_v0"
    assert json.loads((first / "run.json").read_text())["status"] == "done"
    kept = {path.name: path.read_bytes() for path in (first / "duo_v0.safetensors", first / "metrics.jsonl")}
    kept_mtime = (first / "duo_v0.safetensors").stat().st_mtime_ns
    running = client.get(f"/api/comparisons/{cmp_id}").json()
    assert running["status"] == "running" and running["progress"]["variant"] == 1
    assert [v["status"] for v in running["progress"]["variants"]] == ["done", "running"]
    # the comparison holds the job's device (the cpu): the job itself waits for it
    assert client.post("/api/jobs/duo/start").json()["status"] == "queued"
    time.sleep(0.5)
    assert client.get("/api/jobs/duo").json()["status"] == "queued"
    assert client.post("/api/jobs/duo/stop").json()["status"] == "draft"

    assert client.post(f"/api/comparisons/{cmp_id}/stop").json()["status"] == "stopping"
    (holds / "release-step-1").touch()
    stopped = wait_comparison(client, cmp_id, "stopped", "failed", "done")
    assert stopped["status"] == "stopped" and stopped["exit_code"] == 0, stopped["error"]
    assert stopped["progress"]["status"] == "stopped"
    assert (folder / "duo_v1" / "state" / f"{1:09d}.pt").is_file()  # saved where it stopped

    assert client.post(f"/api/comparisons/{cmp_id}/resume").json()["status"] == "queued"
    done = wait_comparison(client, cmp_id, "done", "failed", "stopped")
    assert done["status"] == "done", done["error"]
    # the first variant was not trained again; the second went on from step 1, no step twice
    assert {name: (first / name).read_bytes() for name in kept} == kept
    assert (first / "duo_v0.safetensors").stat().st_mtime_ns == kept_mtime
    second = [json.loads(line)["step"] for line in (folder / "duo_v1" / "metrics.jsonl").read_text().splitlines()]
    assert [step for step in second if step] == [1, 2, 3, 4]
    progress = done["progress"]
    assert [v["status"] for v in progress["variants"]] == ["done", "done"]
    assert [v["step"] for v in progress["variants"]] == [4, 4]
    assert all(len(v["losses"]) == 4 for v in progress["variants"])
    assert progress["prompts"] == ["[trigger] head", "a red car"]
    # previews at steps 2 and 4 for both variants, one per prompt, served as files; one grid per step
    for variant in progress["variants"]:
        for step in ("2", "4"):
            urls = variant["samples"][step]
            assert len(urls) == 2 and all(urls)
            assert client.get(urls[0]).headers["content-type"] == "image/png"
    assert {2, 4} <= {grid["step"] for grid in progress["grids"]}
    assert all((folder / f"grid_{step:09d}.png").is_file() for step in (2, 4))
    assert client.get(progress["summary"]).status_code == 200

    assert client.post(f"/api/comparisons/{cmp_id}/stop").status_code == 409  # done: nothing to stop
    assert client.delete(f"/api/comparisons/{cmp_id}").status_code == 400  # the id must be repeated
    assert client.delete(f"/api/comparisons/{cmp_id}?confirm={cmp_id}").json() == {"deleted": cmp_id}
    assert not folder.exists() and client.get(f"/api/comparisons/{cmp_id}").status_code == 404


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"setting": "model.training_adapter", "values": ["models/adapter_a.safetensors"]}, "values", "two or more"),
        ({"setting": "train.lrr", "values": [1e-3, 2e-3]}, "setting", "train.lrr: unknown key (did you mean 'lr'?)"),
        ({"setting": "job.name", "values": ["x", "y"]}, "setting", "cannot be compared"),
        ({"setting": "train.lr", "values": [1e-3, "0.001"]}, "values.1", "the same train.lr as value 0"),
        ({"setting": "train.lr", "values": [1e-3, -1]}, "values.1", "values.1: train.lr=-1: must be > 0"),
        (
            {"setting": "model.training_adapter", "values": ["models/adapter_a.safetensors", "models/no.safetensors"]},
            "values.1",
            "values.1: model.training_adapter=models/no.safetensors: file not found",
        ),
    ],
)
def test_a_comparison_request_is_refused_in_one_sentence(client, two_adapters, body, field, words):
    small_job(client, "bad", two_adapters[0])
    refused = client.post("/api/jobs/bad/compare", json=body)
    assert refused.status_code == 422, refused.json()
    assert refused.json()["field"] == field and words in refused.json()["error"]
    assert "\n" not in refused.json()["error"]
    assert client.get("/api/comparisons").json() == {"comparisons": []}
