"""Files from Debian packages, fetched without installing anything.

``apt-get download`` puts the ``.deb`` in ``<cache>/debian/debs/``; ``dpkg-deb --fsys-tarfile | tar -x``
unpacks only the members asked for (what ``dpkg -x`` would, restricted to those paths) into
``<cache>/debian/root/<package>/``. Nothing is installed and no system state changes. Both steps are
cached: a second call costs a directory listing.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from probes.errors import UnavailableError
from probes.storage import atomic_dir, cache_root

APT_LISTS = Path("/var/lib/apt/lists")
# Shared libraries the ncnn wheels link against: (package, file to load, members to unpack; the * also
# takes the file that the versioned symlink points to).
NCNN_LIBS = (
    ("libomp5-14", "usr/lib/llvm-14/lib/libomp.so.5", "usr/lib/llvm-14/lib/libomp*"),
    ("libvulkan1", "usr/lib/x86_64-linux-gnu/libvulkan.so.1", "usr/lib/x86_64-linux-gnu/libvulkan*"),
)
_MARKER = ".members.json"


def debian_dir() -> Path:
    return cache_root() / "debian"


def fetch(wanted: dict[str, Sequence[str]]) -> tuple[dict[str, Path], dict[str, str]]:
    """Download and unpack packages, each with its member patterns (tar wildcards, no leading ``./``).

    Returns ``(roots, skipped)``: the unpacked folder of each package that worked, and a one-line reason
    for each that did not. Raises :class:`UnavailableError` when apt cannot work at all (no ``apt-get``,
    or no package lists).
    """
    debs, skipped = _download(sorted(wanted))
    with ThreadPoolExecutor(max_workers=len(debs) or 1) as pool:  # the work runs in dpkg-deb / tar
        futures = {pkg: pool.submit(_unpack, pkg, deb, tuple(wanted[pkg])) for pkg, deb in debs.items()}
    roots: dict[str, Path] = {}
    for pkg, fut in futures.items():
        try:
            roots[pkg] = fut.result()
        except UnavailableError as e:
            skipped[pkg] = e.reason
    return roots, skipped


def _download(packages: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    folder = debian_dir() / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if _deb(folder, p) is None]
    if missing:
        _apt_download(folder, missing)
    debs = {p: d for p in packages if (d := _deb(folder, p)) is not None}
    skipped = {p: "apt-get download failed (not in the package lists?)" for p in packages if p not in debs}
    return debs, skipped


def _deb(folder: Path, package: str) -> Path | None:
    return next(iter(sorted(folder.glob(f"{package}_*.deb"))), None)


def _apt_download(folder: Path, packages: list[str]) -> None:
    if shutil.which("apt-get") is None:
        raise UnavailableError(
            "apt-get", "not found: the embedded data set needs Debian packages (Debian/Ubuntu)"
        )
    if not any(APT_LISTS.glob("*_Packages*")):
        raise UnavailableError(APT_LISTS, "apt package lists are missing: run `apt-get update` and retry")
    # One call for all; a package apt cannot find makes it fail, so retry the rest one by one.
    if _run(["apt-get", "download", *packages], folder) != 0 and len(packages) > 1:
        for pkg in packages:
            _run(["apt-get", "download", pkg], folder)


def _run(cmd: list[str], cwd: Path) -> int:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, check=False).returncode


def _unpack(package: str, deb: Path, members: tuple[str, ...]) -> Path:
    """Unpack the members of ``deb`` matching ``members`` once (keyed by the .deb and the patterns)."""
    dest = debian_dir() / "root" / package
    key = {"deb": deb.name, "members": list(members)}
    marker = dest / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return dest
    if shutil.which("dpkg-deb") is None or shutil.which("tar") is None:
        raise UnavailableError(deb, "dpkg-deb and tar are needed to unpack Debian packages")
    with atomic_dir(dest) as tmp:
        dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        tar = subprocess.run(
            ["tar", "-x", "-C", str(tmp), "--wildcards", *(f"./{m}" for m in members)],
            stdin=dpkg.stdout,
            capture_output=True,
            check=False,
        )
        dpkg.stdout.close()
        errors = [e for e in tar.stderr.decode(errors="replace").splitlines() if not _benign(e)]
        if dpkg.wait() != 0 or errors:
            raise UnavailableError(deb, f"cannot unpack: {' '.join(errors)[:200]}")
        (tmp / _MARKER).write_text(json.dumps(key))
    return dest


def _benign(tar_error: str) -> bool:
    """A member absent from this package version: the caller reports the missing file itself."""
    return "Not found in archive" in tar_error or "Exiting with failure status" in tar_error


def load_ncnn_libs() -> None:
    """Preload libomp and libvulkan (unpacked from Debian) so the ncnn wheels import on the CPU path.

    Raises :class:`UnavailableError` with the reason when they cannot be had.
    """
    roots, skipped = fetch({pkg: [members] for pkg, _, members in NCNN_LIBS})
    for pkg, path, _ in NCNN_LIBS:
        if pkg not in roots:
            raise UnavailableError(pkg, skipped[pkg])
        try:
            ctypes.CDLL(str(roots[pkg] / path), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise UnavailableError(pkg, f"cannot load {path}: {e}") from None
