"""LoRAs from outside the UI's jobs (docs/ui-api.md, "Models, LoRAs, playground"): uploads into DATA/loras, the
read-only ``--lora-dir`` folders, inspect's report for the playground's base model, generating with them, and a job's
checkpoints downloaded in other tools' layouts. Real files on the tiny model: the training adapter written in other
layouts by the format registry, a tiny job trained by the real trainer."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import BASE_JOB, demo_dataset, merge, wait_for
from fastapi.testclient import TestClient
from PIL import Image
from test_ui_api import end_processes

from zimage_lora.errors import UserError
from zimage_lora.lora.formats import largest_difference, module_updates, read_network_file, transformer_names
from zimage_lora.lora.io import read_safetensors, serialize_safetensors
from zimage_lora.lora.tools import convert_lora
from zimage_lora.ui.server import create_app

BASE_URL = "http://127.0.0.1:8675"


@pytest.fixture
def data_dir(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A data folder with the tiny model in models/tiny; processes the UI starts run offline on one thread."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / "models" / "tiny")
    return data


@pytest.fixture(scope="module")
def layouts(tiny_model_dir, tiny_adapter, tmp_path_factory) -> dict[str, Path]:
    """The tiny training adapter (a rank-4 LoRA in our layout) written in every other layout."""
    names = transformer_names(tiny_model_dir)
    folder = tmp_path_factory.mktemp("layouts")
    out = {"zimage-lora": tiny_adapter}
    for fmt in ("kohya", "comfyui", "diffsynth", "diffusers"):
        out[fmt] = folder / f"adapter_{fmt}.safetensors"
        convert_lora(tiny_adapter, out[fmt], fmt, "fp32", names)
    return out


def open_client(data: Path, **options) -> TestClient:
    return TestClient(create_app(data, poll_s=0.1, **options), base_url=BASE_URL)


def upload(client: TestClient, *files: tuple[str, bytes], model: str | None = "models/tiny"):
    query = f"?model={model}" if model else ""
    return client.post(f"/api/loras/upload{query}", files=[("files", file) for file in files])


def leftovers(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "loras").iterdir())


BOUNDARY = "zlboundary"


def multipart(*files: tuple[str, bytes], end: bool = True) -> bytes:
    """A multipart body with ``files`` in field ``files`` (``end=False``: without its closing boundary)."""
    head = 'Content-Disposition: form-data; name="files"; filename="{}"\r\nContent-Type: application/octet-stream'
    parts = [f"--{BOUNDARY}\r\n{head.format(name)}\r\n\r\n".encode() + content + b"\r\n" for name, content in files]
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if end else b"")


def post_chunked(client: TestClient, body: bytes):
    """Upload ``body`` in 64 KiB chunks without a Content-Length, as a streaming client does."""

    def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return client.post("/api/loras/upload?model=models/tiny", content=chunks(), headers=headers)


def test_an_upload_in_another_layout_is_listed_inspected_and_served(data_dir, layouts):
    with open_client(data_dir) as client:
        response = upload(client, ("my kohya LoRA.safetensors", layouts["kohya"].read_bytes()))
        assert response.status_code == 200, response.json()
        [saved] = response.json()["saved"]
        assert saved["file"] == "my_kohya_LoRA.safetensors" and saved["path"] == "loras/my_kohya_LoRA.safetensors"
        report = saved["inspect"]
        assert report.items() >= {"format": "kohya", "kind": "lora", "modules": 28, "ranks": [4]}.items()
        assert report["file"] == saved["path"] and report["model"] == "models/tiny" and report["unmatched"] == []
        assert report["loaders"]["diffusers"].items() >= {"modules": 28, "applied": 56, "dropped": 0}.items()
        # ComfyUI's rules take musubi's names only for its own (fused) modules: the refiners' keys are dropped
        assert report["loaders"]["comfyui"]["dropped"] == 48
        assert report["summary"] == "kohya / musubi-tuner, 28 modules, rank 4, no trigger word recorded"
        assert report["warnings"] == [
            "ComfyUI drops 48 of its keys (e.g. lora_unet_context_refiner_0_attention_to_k.alpha)"
        ]
        assert leftovers(data_dir) == ["my_kohya_LoRA.safetensors"]  # no temporary file left

        [listed] = client.get("/api/loras").json()["loras"]
        assert (
            listed.items()
            >= {
                "job": None,
                "file": "my_kohya_LoRA.safetensors",
                "path": "loras/my_kohya_LoRA.safetensors",
                "source": "upload",
                "arch": None,
                "bytes": layouts["kohya"].stat().st_size,
            }.items()
        )
        assert client.get(listed["url"]).content == layouts["kohya"].read_bytes()

        inspected = client.get("/api/loras/inspect", params={"path": listed["path"], "model": "models/tiny"})
        assert inspected.json() == report
        # without a model, the real Z-Image's layers: the tiny LoRA's shapes do not fit, in one sentence
        real = client.get("/api/loras/inspect", params={"path": listed["path"]})
        assert real.status_code == 422 and real.json()["field"] == "path"
        assert real.json()["error"].startswith("loras/my_kohya_LoRA.safetensors: ")
        assert "is 3840x3840 in Z-Image (6B); the file is for another model size" in real.json()["error"]
        missing = client.get("/api/loras/inspect", params={"path": listed["path"], "model": "models/nothing"})
        assert missing.status_code == 422 and missing.json()["field"] == "model"

        # a second upload of the same name replaces the file; a ComfyUI file keeps its fused layout and its own
        # report (diffusers' conversion refuses ComfyUI's native names)
        again = upload(client, ("my kohya LoRA.safetensors", layouts["comfyui"].read_bytes()))
        assert again.json()["saved"][0]["inspect"]["format"] == "comfyui"
        warnings = again.json()["saved"][0]["inspect"]["warnings"]
        assert len(warnings) == 1 and warnings[0].startswith("diffusers refuses the file: its conversion fails")
        assert leftovers(data_dir) == ["my_kohya_LoRA.safetensors"]


def test_lora_uploads_are_refused_by_type_content_size_and_cut_off_bodies(data_dir, layouts, tmp_path):
    lora = layouts["diffsynth"].read_bytes()
    with open_client(data_dir, max_lora_upload_bytes=len(lora) + 10) as client:
        wrong_type = upload(client, ("notes.txt", b"hello"))
        assert wrong_type.status_code == 415 and wrong_type.json()["field"] == "files"
        assert wrong_type.json()["rejected"] == [
            {"file": "notes.txt", "error": "'notes.txt': only .safetensors files can be uploaded"}
        ]
        garbage = upload(client, ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"))
        assert garbage.status_code == 422
        assert garbage.json()["error"].startswith("broken.safetensors is not a readable .safetensors file")
        not_lora = upload(client, ("model.safetensors", serialize_safetensors({"model.weight": torch.zeros(4, 4)})))
        assert not_lora.status_code == 422 and not_lora.json()["error"] == (
            "model.safetensors: its keys (e.g. 'model.weight') follow no LoRA layout for Z-Image this tool knows"
        )
        sdxl = "lora_unet_down_blocks_0_attentions_0_proj_in"
        sdxl_lora = {f"{sdxl}.lora_down.weight": torch.zeros(4, 8), f"{sdxl}.lora_up.weight": torch.zeros(8, 4)}
        other_family = upload(client, ("sdxl.safetensors", serialize_safetensors(sdxl_lora)))
        assert other_family.status_code == 422 and "a LoRA for another model family" in other_family.json()["error"]
        assert upload(client, ("../up.safetensors", lora)).status_code == 400
        assert upload(client, ("ok.safetensors", lora), model="models/nothing").json()["field"] == "model"
        assert client.post("/api/loras/upload", data={"other": "x"}).json()["field"] == "files"

        started = time.monotonic()
        too_big = upload(client, ("big.safetensors", lora + b"x" * 200_000))
        assert too_big.status_code == 413 and "larger than the limit" in too_big.json()["error"]
        assert time.monotonic() - started < 1  # refused by its Content-Length, before the body is read

        # without a Content-Length (chunked), the limit holds while the body arrives
        streamed = post_chunked(client, multipart(("big.safetensors", lora + b"x" * 20)))
        assert streamed.status_code == 413 and streamed.json()["rejected"][0]["file"] == "big.safetensors"
        cut = post_chunked(client, multipart(("cut.safetensors", lora), end=False)[:-100])
        assert cut.status_code == 400 and "cut off" in cut.json()["error"]
        assert leftovers(data_dir) == []  # nothing refused or cut off stays, not even a temporary file

        mixed = post_chunked(client, multipart(("a.safetensors", lora), ("b.txt", b"x")))
        assert mixed.status_code == 200 and [s["file"] for s in mixed.json()["saved"]] == ["a.safetensors"]
        assert mixed.json()["rejected"][0]["file"] == "b.txt"
        assert leftovers(data_dir) == ["a.safetensors"]
    (data_dir / "loras" / ".upload-1234.tmp").write_bytes(b"half")  # a server killed mid-upload
    with open_client(data_dir):
        assert leftovers(data_dir) == ["a.safetensors"]


def test_lora_dirs_are_listed_read_only_generate_and_refuse_every_escape(data_dir, layouts, tmp_path):
    outside = tmp_path / "comfy-loras"
    (outside / "styles").mkdir(parents=True)
    (outside / ".trash").mkdir()
    shutil.copy(layouts["comfyui"], outside / "fused.safetensors")
    shutil.copy(layouts["diffsynth"], outside / "styles" / "ds.safetensors")
    shutil.copy(layouts["kohya"], outside / ".trash" / "old.safetensors")
    (outside / "notes.txt").write_text("not a LoRA")
    secret = tmp_path / "secret.safetensors"
    shutil.copy(layouts["kohya"], secret)
    (outside / "link.safetensors").symlink_to(secret)  # leads out of the folder
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in outside.rglob("*")}

    with pytest.raises(UserError, match="--lora-dir .*nowhere: no such folder"):
        create_app(data_dir, lora_dirs=[tmp_path / "nowhere"])
    with open_client(data_dir, lora_dirs=[outside]) as client:
        try:
            listed = client.get("/api/loras").json()["loras"]
            assert [(lora["path"], lora["file"], lora["source"]) for lora in listed] == [
                ("lora-dirs/0/fused.safetensors", "fused.safetensors", "folder"),
                ("lora-dirs/0/styles/ds.safetensors", "styles/ds.safetensors", "folder"),
            ]
            assert listed[0]["folder"] == str(outside.resolve())
            assert client.get(listed[1]["url"]).content == layouts["diffsynth"].read_bytes()
            report = client.get("/api/loras/inspect?path=lora-dirs/0/fused.safetensors&model=models/tiny").json()
            assert report["format"] == "comfyui" and report["modules"] == 28 and report["file"] == listed[0]["path"]
            assert report["loaders"]["comfyui"]["dropped"] == 0

            refused = (
                "lora-dirs/0/link.safetensors",  # a link that leads out
                "lora-dirs/0/notes.txt",
                "lora-dirs/0/.trash/old.safetensors",  # hidden: not listed
                "lora-dirs/1/fused.safetensors",
                "lora-dirs/x/fused.safetensors",
            )
            escapes = ("lora-dirs/0/../secret.safetensors", "lora-dirs/0/%2e%2e/secret.safetensors")
            for path in (*refused, *escapes, str(secret), str(secret).lstrip("/")):
                answer = client.get("/api/loras/inspect", params={"path": path})
                assert answer.status_code == 422 and answer.json()["field"] == "path", path
            for path in (
                *refused,
                "lora-dirs/0/%2e%2e/secret.safetensors",
                "lora-dirs/0/%252e%252e/secret.safetensors",
            ):
                assert client.get(f"/files/{path}").status_code == 404, path
            request = {
                "model": "models/tiny",
                "prompt": "a fox",
                "width": 64,
                "height": 64,
                "steps": 1,
                "device": "cpu",
            }
            escape = client.post("/api/generate", json={**request, "loras": [{"path": str(secret)}]})
            assert escape.status_code == 422 and escape.json()["field"] == "loras.0.path"

            # ComfyUI's fused layout and DiffSynth's, from the folder, in one generation
            loras = [{"path": listed[0]["path"], "weight": 0.8}, {"path": listed[1]["path"], "weight": 0.5}]
            gen_id = client.post("/api/generate", json={**request, "loras": loras}).json()["id"]
            generation = wait_for(
                lambda: (g := client.get(f"/api/generate/{gen_id}").json())["status"] in ("done", "failed") and g,
                120,
                "the generation",
            )
            assert generation["status"] == "done", generation["error"]
            image = Image.open(io.BytesIO(client.get(generation["images"][0]).content))
            assert image.size == (64, 64) and "fused.safetensors:0.8, ds.safetensors:0.5" in image.text["loras"]
        finally:
            end_processes(client)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in outside.rglob("*")} == before  # never written


def test_a_checkpoint_downloads_in_other_tools_layouts(data_dir, tiny_adapter, tiny_model_dir, tmp_path):
    demo_dataset(data_dir / "datasets" / "fox", 2)
    config = merge(
        BASE_JOB,
        {
            "job": {"name": "fox"},
            "model": {"name_or_path": "models/tiny", "training_adapter": str(tiny_adapter)},
            "datasets": [{"path": "datasets/fox"}],
            "train": {"steps": 2},
            "save": {"every": 1, "dtype": "fp32"},
        },
    )
    names = transformer_names(tiny_model_dir)
    with open_client(data_dir) as client:
        try:
            assert client.post("/api/jobs", json={"config": config}).status_code == 201
            client.post("/api/jobs/fox/start")
            wait_for(lambda: client.get("/api/jobs/fox").json()["status"] in ("done", "failed"), 120, "the job")
            job = client.get("/api/jobs/fox").json()
            assert job["status"] == "done", job["log_tail"]
        finally:
            end_processes(client)
        final = next(c for c in client.get("/api/jobs/fox/checkpoints").json()["checkpoints"] if c["final"])
        source = data_dir / "jobs" / "fox" / final["file"]
        url = f"/api/jobs/fox/checkpoints/{final['file']}/download"
        original = read_network_file(*read_safetensors(source), list(names.linears))[0]

        ours = client.get(url)
        assert (
            ours.content == source.read_bytes() and 'filename="fox.safetensors"' in ours.headers["content-disposition"]
        )
        for fmt in ("comfyui", "kohya", "diffusers"):
            download = client.get(url, params={"format": fmt})
            assert download.status_code == 200, download.json()
            assert f'filename="fox_{fmt}.safetensors"' in download.headers["content-disposition"]
            (tmp_path / f"{fmt}.safetensors").write_bytes(download.content)
            tensors, metadata = read_safetensors(tmp_path / f"{fmt}.safetensors")
            assert {str(t.dtype) for t in tensors.values()} == {"torch.float32"}  # the checkpoint's dtype kept
            network, detected = read_network_file(tensors, metadata, list(names.linears))
            assert detected == fmt and metadata["zimage_lora.step"] == "2"
            worst, where = largest_difference(module_updates(original), module_updates(network))
            assert worst < 1e-6, (fmt, where, worst)
        assert any(
            k.endswith(".attention.qkv.lora_A.weight") for k in read_safetensors(tmp_path / "comfyui.safetensors")[0]
        )

        cached = sorted((data_dir / ".converted" / "fox").iterdir())
        assert len(cached) == 3
        stamps = [p.stat().st_mtime_ns for p in cached]
        assert client.get(url, params={"format": "comfyui"}).status_code == 200
        assert [p.stat().st_mtime_ns for p in sorted((data_dir / ".converted" / "fox").iterdir())] == stamps

        bad = client.get(url, params={"format": "safetensors"})
        assert bad.status_code == 422 and bad.json()["field"] == "format"
        assert "choose one of zimage-lora, ai-toolkit, diffusers, kohya, comfyui, diffsynth" in bad.json()["error"]
        assert client.get("/api/jobs/fox/checkpoints/job.yaml/download").status_code == 404
        assert client.get("/api/jobs/fox/checkpoints/..%2Fjob.yaml/download").status_code == 404
        assert client.get("/api/jobs/nobody/checkpoints/fox.safetensors/download").status_code == 404
        assert client.delete("/api/jobs/fox?confirm=fox").status_code == 200
        assert not (data_dir / ".converted" / "fox").exists()
