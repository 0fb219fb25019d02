"""The Hub reachability check: a clear error within seconds when a Hub id cannot be fetched, and no request otherwise."""

import http.server
import socket
import threading

import datasets
import pytest
from huggingface_hub import constants

from hf_dawin import DaWinCLIPModel, DaWinMultiTaskCLIPModel
from hf_dawin.datasets_io import load_evaluation_dataset
from hf_dawin.hub_access import check_hub_reachable


@pytest.fixture()
def online(monkeypatch):
    """Lift offline mode, which the tests set, so that the check runs."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


@pytest.fixture()
def refused_endpoint(monkeypatch, online):
    """A loopback port with nothing listening: every connection is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return constants.ENDPOINT


@pytest.fixture()
def silent_endpoint(monkeypatch, online):
    """A loopback port that accepts connections but never responds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    yield constants.ENDPOINT
    listener.close()


class _NotFound(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_HEAD(self):
        _NotFound.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def responding_endpoint(monkeypatch, online):
    """A loopback server that responds to every HEAD request with 404, as the Hub does for a missing repository."""
    _NotFound.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield _NotFound.requests
    server.shutdown()
    server.server_close()


def test_refused_connection_raises(refused_endpoint):
    with pytest.raises(ConnectionError) as error:
        check_hub_reachable("my-org/missing-clip")

    message = str(error.value)
    assert "'my-org/missing-clip' is neither a local folder nor a model repository in the local Hub cache" in message
    assert f"the Hub at {refused_endpoint} could not be reached (ConnectError: " in message
    assert "; timeout 5 s). Connect this machine to the network" in message
    assert "set HF_HUB_OFFLINE=1 to use local files only." in message


def test_silent_server_times_out(silent_endpoint):
    with pytest.raises(ConnectionError, match=r"could not be reached \(\w*Timeout.*; timeout 0.5 s\)"):
        check_hub_reachable("my-org/missing-clip", timeout=0.5)


def test_any_response_counts_as_reachable(responding_endpoint):
    check_hub_reachable("my-org/missing-clip")
    check_hub_reachable("my-org/missing-set", repo_type="dataset")

    assert responding_endpoint == ["/api/models/my-org/missing-clip", "/api/datasets/my-org/missing-set"]


def test_no_request_when_not_needed(responding_endpoint, tmp_path, monkeypatch):
    (tmp_path / "cache" / "models--my-org--cached" / "snapshots").mkdir(parents=True)

    check_hub_reachable(str(tmp_path))  # a local folder
    check_hub_reachable(tmp_path / "missing")  # a Path is never a Hub id
    check_hub_reachable("my-org/cached", cache_dir=tmp_path / "cache")
    check_hub_reachable("my-org/other", local_files_only=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_hub_reachable("my-org/other")

    assert responding_endpoint == []


def test_dataset_check_skipped_when_cached_or_offline(responding_endpoint, tmp_path, monkeypatch):
    (tmp_path / "my-org___cached_set" / "default" / "0.0.0" / "abc123").mkdir(parents=True)
    loaded = []

    def load_dataset(repo_id, **kwargs):
        loaded.append(repo_id)
        raise FileNotFoundError(f"{repo_id} stands in for a dataset")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(FileNotFoundError):
        load_evaluation_dataset("my-org/CachedSet", cache_dir=tmp_path)  # prepared before: loaded from the cache
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError):
        load_evaluation_dataset("my-org/missing-set")

    assert loaded == ["my-org/CachedSet", "my-org/missing-set"]
    assert responding_endpoint == []


def test_loaders_check_before_loading(refused_endpoint, tiny_pair_dirs):
    with pytest.raises(ConnectionError, match="'my-org/missing-clip' is neither a local folder"):
        DaWinCLIPModel.from_pretrained_pair("my-org/missing-clip", tiny_pair_dirs[1], class_names=["a", "b"])
    with pytest.raises(ConnectionError, match="'my-org/missing-dawin' is neither a local folder"):
        DaWinCLIPModel.from_pretrained("my-org/missing-dawin")
    with pytest.raises(ConnectionError, match="'my-org/missing-multitask' is neither a local folder"):
        DaWinMultiTaskCLIPModel.from_pretrained("my-org/missing-multitask")
    with pytest.raises(ConnectionError, match="'my-org/missing-set' is neither a local folder nor a dataset repository"):
        load_evaluation_dataset("my-org/missing-set")
