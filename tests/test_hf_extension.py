"""``hf fusion ...`` through huggingface_hub's CLI extensions: ``hf extensions install OWNER/hf-fusion`` installs this
repository, and ``hf fusion ARGS`` runs its ``hf-fusion ARGS``.

The install is huggingface_hub's own ``hf extensions install`` command, run in a temporary HOME with only its two
downloads stood in for, both at their narrowest point:

- GitHub: every request the command makes goes through ``extensions._github_request``, answered here from this
  checkout the way GitHub serves a repository (a raw file at HEAD, the HEAD commit on the git refs endpoint, 404 for
  what is not there); a request for anything else fails the test.
- The package: pip is handed a wheel built from a GitHub-style zip archive of this checkout in place of
  ``https://github.com/OWNER/hf-fusion/archive/HEAD.zip``, with no index and no dependencies; once pip is done, a path
  file lets the new environment import this environment's dependencies (torch and the rest), so nothing is
  downloaded.

The rest is the real code: name checks, the choice between a binary and a Python extension, the virtual environment
(pip branch; uv is hidden so the branch is the same everywhere), the pip run, the check for the ``hf-fusion`` console
script, the description read from pyproject.toml, the manifest. Then the real ``hf`` runs in a subprocess, with
update checks off and every proxy pointed at a closed port, and dispatches ``hf fusion ...`` to the installed script.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import site
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

extensions = pytest.importorskip("huggingface_hub.cli.extensions", reason="huggingface_hub without CLI extensions")
httpx2 = pytest.importorskip("httpx2")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
OWNER, REPO, NAME = "someone", "hf-fusion", "fusion"
SHA = "0123456789abcdef0123456789abcdef01234567"
ARCHIVE_URL = f"https://github.com/{OWNER}/{REPO}/archive/HEAD.zip"
NO_NETWORK = "http://127.0.0.1:9"


def _checkout_files() -> list[str]:
    """Tracked and new (not ignored) files, as a push of this checkout would put them on GitHub."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the archive's file list comes from git")
    return sorted({f for f in listed.stdout.splitlines() if os.path.lexists(ROOT / f)})


def _github_archive(files: list[str], dest: Path) -> Path:
    """A zip laid out like GitHub's archive/HEAD.zip: one top folder, symbolic links stored as links."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in files:
            path = ROOT / name
            info = zipfile.ZipInfo(f"{REPO}-HEAD/{name}")
            if path.is_symlink():
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, os.readlink(path))
            else:
                info.external_attr = (path.stat().st_mode & 0xFFFF) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
    return dest


def _fake_github(files: list[str], unexpected: list[str]):
    """Stands in for ``extensions._github_request``: GitHub as it would serve this checkout at OWNER/REPO."""
    served = set(files)

    def request(method: str, url: str, *, params: dict | None = None, timeout: float = 0) -> httpx2.Response:
        raw = f"https://raw.githubusercontent.com/{OWNER}/{REPO}/HEAD/"
        status, body = 404, b""
        if method == "HEAD" and url == f"https://github.com/{OWNER}/{REPO}":
            status = 200
        elif method == "GET" and url.startswith(raw):
            path = url.removeprefix(raw)
            if path in served and (ROOT / path).is_file() and not (ROOT / path).is_symlink():
                status, body = 200, (ROOT / path).read_bytes()
        elif method == "GET" and url == f"https://github.com/{OWNER}/{REPO}.git/info/refs":
            status, body = 200, f"001e# service=git-upload-pack\n0000{SHA} HEAD\x00multi_ack\n".encode()
        elif not (method == "GET" and url == f"https://github.com/{OWNER}/{REPO}"):
            unexpected.append(f"{method} {url}")
        response = httpx2.Response(status, content=body, request=httpx2.Request(method, url, params=params))
        response.raise_for_status()
        return response

    return request


def _quiet_env(home: Path) -> dict[str, str]:
    """This environment's variables for a child process: no PYTHONPATH, a temporary HOME, no way out."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.lower().endswith("_proxy")}
    env.update(
        HOME=str(home),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HTTP_PROXY=NO_NETWORK,
        HTTPS_PROXY=NO_NETWORK,
        ALL_PROXY=NO_NETWORK,
    )
    return env


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A HOME in which ``hf extensions install someone/hf-fusion`` has run; the real ~/.local/share/hf is untouched."""
    files = _checkout_files()
    work = tmp_path_factory.mktemp("extension")
    archive = _github_archive(files, work / "HEAD.zip")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + [str(archive), "-w", str(work / "dist")],
        env=_quiet_env(work),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("hf_fusion-*.whl")
    home_dir = work / "home"
    home_dir.mkdir()

    unexpected: list[str] = []
    pip_runs: list[list[str]] = []
    real_run, real_which = subprocess.run, shutil.which
    dependencies = "\n".join(p for p in site.getsitepackages() if Path(p).is_dir()) + "\n"

    def run(cmd, *args, **kwargs):
        if ARCHIVE_URL not in cmd:
            return real_run(cmd, *args, **kwargs)
        pip_runs.append(list(cmd))
        offline = [str(wheel) if part == ARCHIVE_URL else part for part in cmd]
        done = real_run([*offline, "--no-index", "--no-deps", "-q"], *args, **kwargs)
        (packages,) = (extensions._get_extension_dir(NAME) / "venv" / "lib").glob("python3*/site-packages")
        (packages / "dependencies.pth").write_text(dependencies)
        return done

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home_dir))
        patch.delenv("PYTHONPATH", raising=False)
        patch.setattr(extensions, "_github_request", _fake_github(files, unexpected))
        patch.setattr(subprocess, "run", run)
        patch.setattr(shutil, "which", lambda name, *a, **k: None if name == "uv" else real_which(name, *a, **k))
        assert not extensions.EXTENSIONS_ROOT.expanduser().exists()
        from huggingface_hub.cli.hf import app

        app.main(["extensions", "install", f"{OWNER}/{REPO}"], prog_name="hf", standalone_mode=False)
        extension_dir = extensions._get_extension_dir(NAME)
        manifest = extensions.ExtensionManifest.load(extension_dir)

    assert not unexpected, f"requests the fake GitHub does not serve: {unexpected}"
    assert len(pip_runs) == 1 and pip_runs[0][-1] == ARCHIVE_URL
    assert extension_dir == home_dir / ".local" / "share" / "hf" / "extensions" / REPO
    with zipfile.ZipFile(wheel) as built_wheel:
        (metadata,) = [n for n in built_wheel.namelist() if n.endswith(".dist-info/METADATA")]
        summary = email.parser.Parser().parsestr(built_wheel.read(metadata).decode())["Summary"]
    assert (manifest.type, manifest.short_name, manifest.repo_id) == ("python", NAME, f"{OWNER}/{REPO}")
    assert manifest.commit_sha == SHA
    assert manifest.description == summary
    assert Path(manifest.executable_path) == (extension_dir / "venv" / "bin" / REPO).resolve()
    yield home_dir


def _hf(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``hf`` command line of this environment."""
    return subprocess.run(
        [sys.executable, "-m", "huggingface_hub.cli.hf", *args],
        cwd=home,
        env=_quiet_env(home),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _hf_fusion(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """This checkout's ``hf-fusion``: the console script's entry point, hf_fusion.cli:main."""
    env = _quiet_env(home) | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from hf_fusion.cli import main; sys.exit(main())", *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_extension_runs_the_package_installed_from_the_archive(home: Path) -> None:
    """The installed script imports the archive's package, card templates included, not this checkout."""
    python = home / ".local" / "share" / "hf" / "extensions" / REPO / "venv" / "bin" / "python"
    script = (
        "import hf_fusion, importlib.resources as r; print(hf_fusion.__file__); "
        "print(r.files('hf_fusion.model_cards').joinpath('fused_model.md.j2').is_file())"
    )
    done = subprocess.run([str(python), "-c", script], cwd=home, env=_quiet_env(home), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    where, templates = done.stdout.split()
    assert Path(where).is_relative_to(python.parents[2]) and templates == "True"


@pytest.mark.parametrize("args", [("methods",), ("--version",)], ids=["methods", "version"])
def test_hf_fusion_through_hf_matches_hf_fusion(home: Path, args: tuple[str, ...]) -> None:
    through_hf, direct = _hf(home, NAME, *args), _hf_fusion(home, *args)
    assert direct.returncode == 0, direct.stderr
    assert through_hf.returncode == 0, through_hf.stderr
    assert through_hf.stdout == direct.stdout
    assert direct.stdout.strip()


def test_hf_help_lists_the_extension_with_the_project_description(home: Path) -> None:
    manifest = extensions.ExtensionManifest.load(home / ".local" / "share" / "hf" / "extensions" / REPO)
    shown = _hf(home, "--help")
    assert shown.returncode == 0, shown.stderr
    # click wraps the help text (at hyphens too): compare with whitespace taken out
    section = "".join(shown.stdout.partition("Extension commands")[2].split())
    assert "".join(f"{NAME} {manifest.description} [extension {OWNER}/{REPO}]".split()) in section
