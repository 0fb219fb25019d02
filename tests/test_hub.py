"""Hub artifacts: one-commit uploads with model cards, merged CLIP exports and results in cards.

The real `huggingface_hub` upload code runs against `FakeHub`, a loopback HTTP server implementing the few
endpoints that `create_repo`, `create_commit` (YAML validation, preupload, commit with added and deleted files),
`list_repo_files` and `hf_hub_download` use.
"""

import base64
import copy
import hashlib
import io
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, constants
from PIL import Image
from safetensors.torch import load as load_safetensors
from transformers import CLIPModel, pipeline

from hf_dawin import DaWinCLIPModel
from hf_dawin.cli import main
from hf_dawin.evaluation import EvaluationSet, EvaluationSettings, evaluate_pair, summarize
from hf_dawin.heads import build_zero_shot_head, encode_image_features
from hf_dawin.hub import (
    RESULTS_END_MARKER,
    RESULTS_START_MARKER,
    build_model_card,
    eval_results_from,
    push_dawin_to_hub,
    push_merged_component,
    push_results_to_hub,
    save_merged_components,
)

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, TINY_TEMPLATES


ZERO_SHOT_ID = "openai/clip-vit-base-patch32"
FINE_TUNED_ID = "someone/clip-vit-base-patch32-finetuned"


class FakeHub:
    """Loopback stand-in for the Hub endpoints used by uploads and card downloads."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body=b"", headers=None, content_type="application/json"):
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                hub.requests.append(("POST", self.path))
                host = f"http://{self.headers['Host']}"

                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    hub.repos.setdefault(repo_id, {})
                    return self.reply(200, {"url": f"{host}/{repo_id}"})

                if path == "/api/validate-yaml":
                    return self.reply(200, {})

                match = re.fullmatch(r"/api/models/(.+)/branch/([^/]+)", path)
                if match:
                    hub.branches.append(match.groups())
                    return self.reply(200, {})

                match = re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path)
                if match:
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self.reply(200, {"files": modes})

                # The commit body is NDJSON: a header line, then one line per file with base64 content.
                match = re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path)
                if match:
                    repo_id = match.group(1)
                    if repo_id not in hub.repos:
                        return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    header, files, deleted = None, {}, []
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            header = item["value"]
                        elif item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "deletedFile":
                            deleted.append(item["value"]["path"])
                    for path in deleted:
                        hub.repos[repo_id].pop(path, None)
                    hub.repos[repo_id].update(files)
                    oid = hashlib.sha1(f"{repo_id}{len(hub.commits)}".encode()).hexdigest()
                    hub.commits.append(
                        {"repo_id": repo_id, "header": header, "files": files, "deleted": deleted, "query": self.path}
                    )
                    return self.reply(
                        200,
                        {
                            "commitUrl": f"{host}/{repo_id}/commit/{oid}",
                            "commitOid": oid,
                            "pullRequestUrl": f"{host}/{repo_id}/discussions/1",
                        },
                    )

                self.reply(404, {"error": f"Unknown endpoint {path}"})

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                hub.requests.append((self.command, self.path))
                match = re.fullmatch(r"/api/models/(.+)/tree/([^/]+)", self.path.split("?")[0])
                if match:
                    repo_id = match.group(1)
                    if repo_id not in hub.repos:
                        return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    entries = [
                        {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for path, data in sorted(hub.repos[repo_id].items())
                    ]
                    return self.reply(200, entries)
                match = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if not match:
                    return self.reply(404, {"error": "Unknown endpoint"})
                repo_id, _, filename = match.groups()
                if repo_id not in hub.repos:
                    return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if filename not in hub.repos[repo_id]:
                    return self.reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = hub.repos[repo_id][filename]
                headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": "0" * 40}
                self.reply(200, data, headers, "application/octet-stream")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@pytest.fixture()
def fake_hub(monkeypatch):
    hub = FakeHub()
    # Refuse to resolve any other host, so a request that misses the fake fails here instead of leaving the machine.
    resolve = socket.getaddrinfo

    def resolve_loopback_only(host, *args, **kwargs):
        if host not in LOOPBACK_HOSTS:
            raise OSError(f"test_hub: resolving {host!r} is blocked, because only the loopback fake Hub may be reached.")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve_loopback_only)
    # Point huggingface_hub at the fake as HF_ENDPOINT would at import time, and lift offline mode for it.
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield hub
    hub.close()


@pytest.fixture(scope="module")
def pair_model(tiny_pair_dirs):
    return DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
    )


@pytest.fixture(scope="module")
def calibration_pixels():
    generator = torch.Generator().manual_seed(21)
    return torch.randn(24, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


@pytest.fixture()
def hub_model(tiny_pair_dirs, calibration_pixels):
    """A calibrated model in mixture mode whose endpoints claim Hub ids."""
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
        mode="mixture", temperatures=(0.9576, 0.9733),
    )
    model.calibrate([calibration_pixels])
    model.config.zero_shot_name_or_path = ZERO_SHOT_ID
    model.config.fine_tuned_name_or_path = FINE_TUNED_ID
    return model


def tensor_set(name, pixel_values, labels, *, in_distribution=False):
    def batches():
        for start in range(0, len(labels), 8):
            stop = min(start + 8, len(labels))
            yield pixel_values[start:stop], labels[start:stop], torch.arange(start, stop)

    return EvaluationSet(name, batches, len(labels), in_distribution=in_distribution)


@pytest.fixture(scope="module")
def results(pair_model):
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(24, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, len(TINY_CLASS_NAMES), (24,), generator=generator)
    sets = [
        tensor_set("pets", pixel_values[:12], labels[:12], in_distribution=True),
        tensor_set("pets-sketch", pixel_values[12:] * 2.0, labels[12:]),
    ]
    results = evaluate_pair(pair_model, sets, EvaluationSettings(alphas=(0.0, 0.5, 1.0), progress=False))
    results["dataset_sources"] = {"pets": "my-org/pets", "pets-sketch": "/data/pets-sketch"}
    return results


def model_index(card):
    """Map (dataset name, metric type) to the value in a card's model-index."""
    entries = {}
    for result in card.data.eval_results or []:
        entries[(result.dataset_name, result.metric_type)] = result.metric_value
    return entries


# ----------------------------------------------------------------------------------------------------------
# DaWin uploads
# ----------------------------------------------------------------------------------------------------------


def test_push_uploads_everything_in_one_commit(fake_hub, hub_model, results, tmp_path):
    info = push_dawin_to_hub(hub_model, "my-org/tiny-dawin", results=results, commit_message="Add DaWin")

    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["repo_id"] == "my-org/tiny-dawin"
    assert commit["header"]["summary"] == "Add DaWin"
    assert info.commit_url.endswith(f"/my-org/tiny-dawin/commit/{info.oid}")
    files = commit["files"]
    expected = {
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "modeling_dawin.py", "configuration_dawin.py", "mixture.py",
    }
    assert expected <= set(files)

    config = json.loads(files["config.json"])
    assert config["mode"] == "mixture"
    assert config["mixture"] == hub_model.config.mixture
    assert config["temperatures"] == [0.9576, 0.9733]
    weights = load_safetensors(files["model.safetensors"])
    for prefix in ("zero_shot.vision_model.", "fine_tuned.vision_model.", "zero_shot.text_model.", "fine_tuned_head.", "zero_shot_head."):
        assert any(key.startswith(prefix) for key in weights), prefix

    # The uploaded folder is a complete model.
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    loaded = DaWinCLIPModel.from_pretrained(tmp_path)
    pixel_values = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, hub_model(pixel_values=pixel_values).logits)


def test_pipeline_loads_pushed_repo_and_url(fake_hub, hub_model, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    push_dawin_to_hub(hub_model, "my-org/tiny-dawin")
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    fake_hub.repos["my-org/images"] = {"cat.png": encoded.getvalue()}

    classifier = pipeline("image-classification", model="my-org/tiny-dawin")
    predictions = classifier(f"{fake_hub.endpoint}/my-org/images/resolve/main/cat.png", top_k=len(TINY_CLASS_NAMES))

    # Files after config.json may be fetched at the commit the config came from instead of at "main".
    downloaded = {
        path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in fake_hub.requests if "/tiny-dawin/resolve/" in path
    }
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= downloaded
    assert ("GET", "/my-org/images/resolve/main/cat.png") in fake_hub.requests
    assert isinstance(classifier.model, DaWinCLIPModel)
    assert classifier.model.config.mode == "mixture"
    inputs = hub_model.image_processor(images=image, return_tensors="pt")
    with torch.no_grad():
        expected = hub_model(pixel_values=inputs["pixel_values"]).logits[0].softmax(-1)
    scores = {prediction["label"]: prediction["score"] for prediction in predictions}
    assert set(scores) == set(TINY_CLASS_NAMES)
    for index, name in enumerate(TINY_CLASS_NAMES):
        assert scores[name] == pytest.approx(float(expected[index]), abs=1e-5)


def test_invalid_results_fail_before_creating_repo(fake_hub, pair_model, results):
    model = copy.deepcopy(pair_model)
    model.config.mode = "static"
    model.config.alpha = 0.3

    with pytest.raises(ValueError, match="do not include the model's static alpha 0.3"):
        push_dawin_to_hub(model, "my-org/static-dawin", results=results)

    assert "my-org/static-dawin" not in fake_hub.repos
    assert not fake_hub.commits


def test_repush_with_shards_deletes_old_weights(fake_hub, hub_model):
    push_dawin_to_hub(hub_model, "my-org/tiny-dawin")
    push_dawin_to_hub(hub_model, "my-org/tiny-dawin", max_shard_size="100KB")

    files = fake_hub.repos["my-org/tiny-dawin"]
    assert "model.safetensors" not in files
    assert "model.safetensors.index.json" in files
    index = json.loads(files["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) <= set(files)
    assert fake_hub.commits[1]["deleted"] == ["model.safetensors"]
    assert "README.md" in files


def test_push_invalid_setting_sends_nothing(fake_hub, hub_model):
    hub_model.config.alpha = 2.0
    with pytest.raises(ValueError, match="alpha"):
        hub_model.push_to_hub("my-org/tiny-dawin")
    assert fake_hub.requests == []
    assert "my-org/tiny-dawin" not in fake_hub.repos


def test_pushed_card_metadata(fake_hub, hub_model, results):
    push_dawin_to_hub(hub_model, "my-org/tiny-dawin", results=results)

    card = ModelCard(fake_hub.repos["my-org/tiny-dawin"]["README.md"].decode())
    assert card.data.base_model == [ZERO_SHOT_ID, FINE_TUNED_ID]
    assert card.data.to_dict()["base_model_relation"] == "merge"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.library_name == "transformers"
    assert {"dawin", "clip", "weight-interpolation", "robust-fine-tuning"} <= set(card.data.tags)
    assert card.data.model_name == "tiny-dawin"
    # Mixture mode reports the DaWin mixture scores of every set.
    entries = model_index(card)
    for name in ("pets", "pets-sketch"):
        scores = results["sets"][name]["scores"]["dawin_mixture"]
        assert entries[(name, "accuracy")] == pytest.approx(scores["accuracy"])
        assert entries[(name, "f1")] == pytest.approx(scores["f1"])
    dataset_types = {result.dataset_name: result.dataset_type for result in card.data.eval_results}
    assert dataset_types == {"pets": "my-org/pets", "pets-sketch": "pets-sketch"}
    assert {result.task_type for result in card.data.eval_results} == {"image-classification"}


def test_pushed_card_text(fake_hub, hub_model, results):
    push_dawin_to_hub(hub_model, "my-org/tiny-dawin", results=results)

    text = ModelCard(fake_hub.repos["my-org/tiny-dawin"]["README.md"].decode()).text
    assert summarize(results, markdown=True) in text
    assert "| mode | `mixture` |" in text
    assert "| temperatures (zero-shot, fine-tuned) | 0.9576, 0.9733 |" in text
    assert "| offset adjustment | off |" in text
    mixture = hub_model.config.mixture
    for alpha, beta in zip(mixture["alphas"], mixture["betas"]):
        assert f"{alpha:.6g}" in text
        assert f"{beta:.6g}" in text
    assert 'pipeline("image-classification", model="my-org/tiny-dawin")' in text
    assert "trust_remote_code=True" in text
    assert "@inproceedings{oh2025dawin" in text
    assert text.count(RESULTS_START_MARKER) == 1


def test_model_push_to_hub_delegates(fake_hub, hub_model):
    hub_model.push_to_hub("my-org/tiny-dawin", commit_message="Upload")

    assert len(fake_hub.commits) == 1
    files = fake_hub.commits[0]["files"]
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == [ZERO_SHOT_ID, FINE_TUNED_ID]
    assert card.data.eval_results is None
    assert "No evaluation results were given" in card.text


def test_push_to_branch_and_pull_request(fake_hub, hub_model):
    push_dawin_to_hub(hub_model, "my-org/tiny-dawin", revision="dev")
    push_dawin_to_hub(hub_model, "my-org/tiny-dawin", create_pr=True)

    assert fake_hub.branches == [("my-org/tiny-dawin", "dev")]
    assert [commit["query"] for commit in fake_hub.commits] == [
        "/api/models/my-org/tiny-dawin/commit/dev",
        "/api/models/my-org/tiny-dawin/commit/main?create_pr=1",
    ]


def test_card_leaves_local_endpoints_out_of_base_model(pair_model):
    card = build_model_card(pair_model, repo_id="my-org/local-pair")

    assert card.data.base_model is None
    assert "local checkpoint `zero_shot`" in card.text
    assert "local checkpoint `fine_tuned`" in card.text


# ----------------------------------------------------------------------------------------------------------
# Merged CLIP exports
# ----------------------------------------------------------------------------------------------------------


def test_save_merged_components_are_plain_clip(hub_model, tmp_path):
    folders = save_merged_components(hub_model, tmp_path)

    means = hub_model.stored_mixture().component_means
    assert [folder.name for folder in folders] == [f"alpha_{mean:.4f}" for mean in means]
    merged = CLIPModel.from_pretrained(folders[0])
    expected = hub_model.merge(float(means[0])).state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    card = ModelCard.load(folders[0] / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.base_model == [ZERO_SHOT_ID, FINE_TUNED_ID]
    assert "component 0 of the Beta mixture" in card.text

    classifier = pipeline("zero-shot-image-classification", model=str(folders[0]))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    predictions = classifier(image, candidate_labels=["cat", "dog", "bird"])
    assert sorted(prediction["label"] for prediction in predictions) == ["bird", "cat", "dog"]
    assert sum(prediction["score"] for prediction in predictions) == pytest.approx(1.0, abs=1e-5)


def test_save_merged_static_alpha(pair_model, tmp_path):
    (folder,) = save_merged_components(pair_model, tmp_path, alphas=[0.25])

    assert folder.name == "alpha_0.2500"
    merged = CLIPModel.from_pretrained(folder)
    zero_shot, fine_tuned = pair_model.zero_shot.state_dict(), pair_model.fine_tuned.state_dict()
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(merged.state_dict()[key], 0.75 * zero_shot[key] + 0.25 * fine_tuned[key])
    assert "static coefficient" in ModelCard.load(folder / "README.md").text


def test_merged_card_warns_text_tower_changed(pair_model, tmp_path):
    (folder,) = save_merged_components(pair_model, tmp_path, alphas=[0.5])
    text = ModelCard.load(folder / "README.md").text
    assert "Fine-tuning changed the text tower" in text
    assert "matches hf_dawin's static mode" not in text


def test_merged_card_shared_text_tower_matches(tiny_endpoints, tiny_processor, tmp_path):
    zero_shot, fine_tuned = copy.deepcopy(tiny_endpoints[0]), copy.deepcopy(tiny_endpoints[1])
    vision_side = ("vision_model.", "visual_projection.")
    text_side = {name: value for name, value in zero_shot.state_dict().items() if not name.startswith(vision_side)}
    fine_tuned.load_state_dict(text_side, strict=False)
    model = DaWinCLIPModel.from_pretrained_pair(
        zero_shot, fine_tuned, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor
    )

    (folder,) = save_merged_components(model, tmp_path, alphas=[0.3])
    assert "matches hf_dawin's static mode at the same α" in ModelCard.load(folder / "README.md").text

    # The claim holds: the exported checkpoint's own zero-shot classifier gives hf_dawin's static logits.
    merged = CLIPModel.from_pretrained(folder)
    head = build_zero_shot_head(merged, tiny_processor.tokenizer, TINY_CLASS_NAMES, TINY_TEMPLATES)
    pixel_values = torch.randn(5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        own_logits = encode_image_features(merged, pixel_values).float() @ head.T
        dawin_logits = model(pixel_values=pixel_values, mode="static", alpha=0.3).logits
    torch.testing.assert_close(own_logits, dawin_logits, atol=1e-4, rtol=1e-4)


def test_save_merged_close_alphas_get_separate_folders(pair_model, tmp_path):
    folders = save_merged_components(pair_model, tmp_path, alphas=[0.5, 0.50001, 0.75])

    assert [folder.name for folder in folders] == ["alpha_0.5000_export0", "alpha_0.5000_export1", "alpha_0.7500"]
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    zero_shot, fine_tuned = pair_model.zero_shot.state_dict()[key], pair_model.fine_tuned.state_dict()[key]
    merged = CLIPModel.from_pretrained(folders[1]).state_dict()[key]
    torch.testing.assert_close(merged, 0.49999 * zero_shot + 0.50001 * fine_tuned)


def test_save_merged_needs_mixture_or_alphas(pair_model, tmp_path):
    with pytest.raises(ValueError, match="no fitted Beta mixture"):
        save_merged_components(pair_model, tmp_path)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        save_merged_components(pair_model, tmp_path, alphas=[1.5])


def test_push_merged_component_one_commit(fake_hub, hub_model):
    alpha = float(hub_model.stored_mixture().component_means[1])

    push_merged_component(hub_model, "my-org/tiny-merged", alpha, component=1)

    assert len(fake_hub.commits) == 1
    files = fake_hub.commits[0]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["model_type"] == "clip"
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert 'model="my-org/tiny-merged"' in card.text


# ----------------------------------------------------------------------------------------------------------
# Results in existing cards
# ----------------------------------------------------------------------------------------------------------


EXISTING_CARD = """---
license: apache-2.0
model-index:
- name: tiny-dawin
  results:
  - task:
      type: image-classification
    dataset:
      name: other-set
      type: other-set
    metrics:
    - type: accuracy
      value: 0.42
---

# My model

Hand-written notes that must survive.
"""


def test_push_results_updates_existing_card(fake_hub, results):
    fake_hub.repos["my-org/tiny-dawin"] = {"README.md": EXISTING_CARD.encode()}

    push_results_to_hub("my-org/tiny-dawin", results, method="dawin_sample")

    assert len(fake_hub.commits) == 1
    assert set(fake_hub.commits[0]["files"]) == {"README.md"}
    card = ModelCard(fake_hub.repos["my-org/tiny-dawin"]["README.md"].decode())
    assert card.data.license == "apache-2.0"
    assert "Hand-written notes that must survive." in card.text
    entries = model_index(card)
    assert entries[("other-set", "accuracy")] == pytest.approx(0.42)
    assert entries[("pets", "accuracy")] == pytest.approx(results["sets"]["pets"]["scores"]["dawin_sample"]["accuracy"])
    assert summarize(results, markdown=True) in card.text
    assert "entries for datasets that this evaluation did not cover: `other-set`." in card.text


def test_push_results_other_method_drops_stale_metrics(fake_hub, results):
    push_results_to_hub("my-org/tiny-dawin", results, method="dawin_sample")

    push_results_to_hub("my-org/tiny-dawin", results, method=None, static_alpha=0.5)

    card = ModelCard(fake_hub.repos["my-org/tiny-dawin"]["README.md"].decode())
    # WiSE-FT reports accuracy only, so DaWin's macro F1 from the first push must not stay beside it.
    assert set(model_index(card)) == {("pets", "accuracy"), ("pets-sketch", "accuracy")}
    alpha_index = results["wise_ft_sweep"]["alphas"].index(0.5)
    assert model_index(card)[("pets", "accuracy")] == pytest.approx(
        results["wise_ft_sweep"]["accuracy"]["pets"][alpha_index]
    )
    assert "did not cover" not in card.text
    assert "reports WiSE-FT at alpha = 0.5, the model's static weights." in card.text
    assert "fits the Beta mixture" not in card.text
    assert {result.metric_name for result in card.data.eval_results} == {"WiSE-FT (alpha=0.5) accuracy"}


def _pets_only(results):
    """Return a copy of `results` with the in-distribution set 'pets' alone, as from a later, smaller evaluation."""
    pets_only = json.loads(json.dumps(results))
    del pets_only["sets"]["pets-sketch"]
    pets_only["out_of_distribution"] = []
    return pets_only


def test_kept_entries_name_their_method(fake_hub, results):
    push_results_to_hub("my-org/tiny-dawin", results, method="dawin_sample")
    push_results_to_hub("my-org/tiny-dawin", _pets_only(results), method="dawin_mixture")

    card = ModelCard(fake_hub.repos["my-org/tiny-dawin"]["README.md"].decode())
    names = {(result.dataset_name, result.metric_type): result.metric_name for result in card.data.eval_results}
    assert names == {
        ("pets-sketch", "accuracy"): "DaWin (sample) accuracy",
        ("pets-sketch", "f1"): "DaWin (sample) macro F1",
        ("pets", "accuracy"): "DaWin (mixture) accuracy",
        ("pets", "f1"): "DaWin (mixture) macro F1",
    }
    assert "Entries that hf-dawin wrote name their method in the metric name, and those of a run limited" in card.text


def test_push_results_keeps_model_weights(fake_hub, hub_model, results):
    push_dawin_to_hub(hub_model, "my-org/tiny-dawin")
    weights = fake_hub.repos["my-org/tiny-dawin"]["model.safetensors"]

    push_results_to_hub("my-org/tiny-dawin", results)

    assert fake_hub.commits[-1]["deleted"] == []
    assert set(fake_hub.commits[-1]["files"]) == {"README.md"}
    assert fake_hub.repos["my-org/tiny-dawin"]["model.safetensors"] == weights
    reloaded = DaWinCLIPModel.from_pretrained("my-org/tiny-dawin")
    assert reloaded.config.mode == "mixture"


def test_push_results_twice_replaces_entries(fake_hub, results):
    fake_hub.repos["my-org/tiny-dawin"] = {"README.md": EXISTING_CARD.encode()}
    push_results_to_hub("my-org/tiny-dawin", results)
    changed = json.loads(json.dumps(results))
    changed["sets"]["pets"]["scores"]["dawin_sample"]["accuracy"] = 0.125

    push_results_to_hub("my-org/tiny-dawin", changed)

    assert len(fake_hub.commits) == 2
    card = ModelCard(fake_hub.repos["my-org/tiny-dawin"]["README.md"].decode())
    accuracies = [r.metric_value for r in card.data.eval_results if r.dataset_name == "pets" and r.metric_type == "accuracy"]
    assert accuracies == [0.125]
    assert card.text.count(RESULTS_START_MARKER) == 1
    assert card.text.count(RESULTS_END_MARKER) == 1
    assert "| 12.50 |" in card.text


def test_push_results_creates_card(fake_hub, results):
    push_results_to_hub("my-org/new-repo", results)

    card = ModelCard(fake_hub.repos["my-org/new-repo"]["README.md"].decode())
    zero_shot, fine_tuned = results["settings"]["temperatures"]
    assert (
        f"Evaluation settings: temperatures {zero_shot:g} (zero-shot) and {fine_tuned:g} (fine-tuned), offset "
        "adjustment off, 3 Beta mixture components."
    ) in card.text
    assert card.data.pipeline_tag == "image-classification"
    assert set(model_index(card)) == {(name, metric) for name in ("pets", "pets-sketch") for metric in ("accuracy", "f1")}
    assert "--max-examples" not in card.text


def test_card_says_when_sets_were_limited(fake_hub, results):
    limited = json.loads(json.dumps(results))
    limited["settings"].update(max_examples=300, seed=0)

    push_results_to_hub("my-org/new-repo", limited)

    card = ModelCard(fake_hub.repos["my-org/new-repo"]["README.md"].decode())
    assert (
        "Each set was limited to at most 300 images (`--max-examples 300`), so the scores are those of that subset, "
        "not of the full sets."
    ) in card.text
    assert {str(result.dataset_args) for result in card.data.eval_results} == {str({"max_examples": 300, "seed": 0})}


def test_limit_stays_with_kept_entries(fake_hub, results):
    limited = json.loads(json.dumps(results))
    limited["settings"].update(max_examples=10, seed=0)
    push_results_to_hub("my-org/tiny-dawin", limited, method="dawin_sample")
    push_results_to_hub("my-org/tiny-dawin", _pets_only(results), method="dawin_mixture")

    card = ModelCard(fake_hub.repos["my-org/tiny-dawin"]["README.md"].decode())
    arguments = {result.dataset_name: result.dataset_args for result in card.data.eval_results}
    assert arguments == {"pets-sketch": {"max_examples": 10, "seed": 0}, "pets": None}
    assert "--max-examples 10" not in card.text
    assert "carry the limit in their `dataset_args`." in card.text


def _image_dataset(path, seed, count=8):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(count)]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": [i % len(TINY_CLASS_NAMES) for i in range(count)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=TINY_CLASS_NAMES)}),
    )
    dataset.save_to_disk(str(path))
    return path


def test_cli_push_results(fake_hub, tiny_pair_dirs, tmp_path, capsys):
    id_dir = _image_dataset(tmp_path / "pets", 0)
    shift_dir = _image_dataset(tmp_path / "sketch", 1)

    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(id_dir), "--shift-dataset", f"sketch={shift_dir}", "--alphas", "0,1",
        "--output-dir", str(tmp_path / "out"), "--no-progress", "--no-plots", "--push-results", "my-org/evaluated",
    ])

    assert exit_code == 0
    assert len(fake_hub.commits) == 1
    card = ModelCard(fake_hub.repos["my-org/evaluated"]["README.md"].decode())
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    entries = model_index(card)
    assert entries[("sketch", "accuracy")] == pytest.approx(written["sets"]["sketch"]["scores"]["dawin_sample"]["accuracy"])
    assert entries[("pets", "f1")] == pytest.approx(written["sets"]["pets"]["scores"]["dawin_sample"]["f1"])
    assert "my-org/evaluated" in capsys.readouterr().out


def test_cli_push_failure_is_one_line(fake_hub, tiny_pair_dirs, tmp_path, capsys, monkeypatch):
    # A loopback port with nothing listening: the upload's connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint)
    id_dir = _image_dataset(tmp_path / "pets", 0)

    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(id_dir), "--alphas", "0,1", "--output-dir", str(tmp_path / "out"), "--no-progress",
        "--no-plots", "--push-results", "my-org/evaluated",
    ])  # fmt: skip

    assert exit_code == 1
    error = capsys.readouterr().err
    assert "hf-dawin evaluate: error: Pushing the results to my-org/evaluated failed (" in error
    assert f"The results are saved in {tmp_path / 'out'}" in error
    assert "Traceback" not in error
    assert (tmp_path / "out" / "results.json").is_file()


def test_cli_push_results_offline_fails_before_running(tiny_pair_dirs, tmp_path):
    started = time.perf_counter()
    with pytest.raises(SystemExit, match="offline mode is on"):
        main([
            "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
            "--id-dataset", str(tmp_path), "--push-results", "my-org/evaluated",
        ])
    assert time.perf_counter() - started < 5


# ----------------------------------------------------------------------------------------------------------
# Unknown repositories offline
# ----------------------------------------------------------------------------------------------------------


def test_unknown_repo_offline_from_pretrained():
    started = time.perf_counter()
    with pytest.raises(OSError, match="Could not load a DaWin model from 'nobody-here/no-such-dawin-model'") as error:
        DaWinCLIPModel.from_pretrained("nobody-here/no-such-dawin-model")
    assert "Offline mode is on (HF_HUB_OFFLINE=1)" in str(error.value)
    assert time.perf_counter() - started < 5


def test_unknown_repo_offline_from_pretrained_pair():
    started = time.perf_counter()
    with pytest.raises(OSError, match="Could not load the zero-shot endpoint from 'nobody-here/no-such-clip'") as error:
        DaWinCLIPModel.from_pretrained_pair("nobody-here/no-such-clip", "nobody-here/other", class_names=["a", "b"])
    assert "Offline mode is on (HF_HUB_OFFLINE=1)" in str(error.value)
    assert "not a local folder, and the Hub cache has no copy of it" in str(error.value)
    assert "internet connection" not in str(error.value)
    assert "\n" not in str(error.value)
    assert time.perf_counter() - started < 5


def test_unknown_repo_online_suggests_offline_mode(fake_hub):
    with pytest.raises(OSError, match="Could not load a DaWin model from 'my-org/no-such-model'") as error:
        DaWinCLIPModel.from_pretrained("my-org/no-such-model")
    assert "set HF_HUB_OFFLINE=1 so that Hub lookups fail at once" in str(error.value)


def _hub_files(model, folder, *, max_shard_size="5GB"):
    """Save `model` and return its files as a fake Hub repository, with config.json naming no dtype."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("max_shard_size", ["5GB", "20KB"])
def test_hub_endpoint_dtype_from_header(fake_hub, tiny_pair_dirs, tmp_path, max_shard_size):
    fine_tuned = CLIPModel.from_pretrained(tiny_pair_dirs[1]).to(torch.float16)
    files = _hub_files(fine_tuned, tmp_path / "fp16", max_shard_size=max_shard_size)
    fake_hub.repos["someone/tiny-fine-tuned-fp16"] = files
    sharded = "model.safetensors.index.json" in files
    assert sharded == (max_shard_size == "20KB")

    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], "someone/tiny-fine-tuned-fp16", class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
        cache_dir=tmp_path / "hub-cache",
    )

    assert model.fine_tuned.dtype == torch.float32
    assert model.zero_shot.dtype == torch.float32


def test_unknown_repo_offline_cli(tmp_path, capsys):
    id_dir = _image_dataset(tmp_path / "pets", 0)
    capsys.readouterr()
    started = time.perf_counter()

    exit_code = main([
        "evaluate", "--model", "nobody-here/no-such-dawin-model", "--id-dataset", str(id_dir),
        "--output-dir", str(tmp_path / "out"), "--no-progress",
    ])

    assert exit_code == 1
    assert time.perf_counter() - started < 5
    error = capsys.readouterr().err
    assert "hf-dawin evaluate: error: Could not load a DaWin model from 'nobody-here/no-such-dawin-model'" in error
    assert "Traceback" not in error
    assert error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_dataset_offline_cli(tiny_pair_dirs, tmp_path, capsys):
    started = time.perf_counter()

    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", "nobody-here/no-such-dataset", "--output-dir", str(tmp_path / "out"), "--no-progress",
    ])

    assert exit_code == 1
    assert time.perf_counter() - started < 5
    error = capsys.readouterr().err
    assert "'nobody-here/no-such-dataset'" in error
    assert "offline mode is on" in error


def test_best_alpha_entries_name_alpha(results):
    best_alpha = results["wise_ft_sweep"]["best_alpha"]

    entries = eval_results_from(results, method="wise_ft_best")

    assert {entry.metric_name for entry in entries} == {
        f"WiSE-FT (best alpha={best_alpha:g}) accuracy",
        f"WiSE-FT (best alpha={best_alpha:g}) macro F1",
    }


def test_entries_carry_recorded_split(results):
    with_splits = dict(results, dataset_splits={"pets": "validation", "pets-sketch": None})

    entries = eval_results_from(with_splits, method="dawin_sample")

    assert {entry.dataset_name: entry.dataset_split for entry in entries} == {"pets": "validation", "pets-sketch": None}
