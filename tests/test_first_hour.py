"""A new user's first hour: the README's demo command as a newcomer runs it, and what the build needs.

The demo test runs the README's first command in a subprocess from a folder
outside the repo, with an empty cache and no VP_GGUF_* variables: it is the
installed package that runs, so a dependency on the checkout or on one
developer's paths fails here.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import bootstrap
import fetch_llama_cpp as fetch
from vp_gguf import _build_info

ROOT = Path(__file__).resolve().parents[1]


def _quick_start() -> list[str]:
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no Quick start commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def _newcomer_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VP_GGUF_", "PYTEST_", "MAKE", "MFLAGS", "VIRTUAL_ENV", "PYTHONPATH"))
           # set in this process by the .pth of the venv running the tests
           and k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # vp-gguf's cache: empty
    # ccache keeps its own folder: a rebuild here would otherwise be cold
    env.setdefault("CCACHE_DIR", os.environ.get("CCACHE_DIR") or str(Path.home() / ".cache" / "ccache"))
    return env


def test_readme_commands_are_two_make_targets():
    assert _quick_start() == ["make demo", "make test"]


def test_readme_demo_command_as_a_newcomer_runs_it(tmp_path):
    demo = shlex.split(_quick_start()[0])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = _newcomer_env(tmp_path)
    r = subprocess.run([demo[0], "-C", str(ROOT), *demo[1:]], cwd=outside, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "40/40 digits right" in r.stdout, r.stdout[-3000:]
    kept = re.search(r"kept (\d+\.\d)% of the image tokens per step", r.stdout)
    assert kept and float(kept.group(1)) < 10, r.stdout[-3000:]  # a selection, not a skipped one
    # it used the empty cache it was given (and no other vp-gguf cache)
    assert list((tmp_path / "cache" / "vp-gguf" / "testbed").glob("glyph-mmproj-*.gguf"))


def test_help_models_and_fetch_do_not_load_libllama():
    code = ("import sys, vp_gguf.cli as c, vp_gguf.fetch, vp_gguf.catalog; c.build_parser().format_help(); "
            "bad = sorted(m for m in sys.modules if m.startswith(('llama_cpp', 'vp_gguf._libs', 'vp_gguf.model'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_public_names_load_on_first_use():
    import vp_gguf
    assert vp_gguf.VisionModel.__name__ == "VisionModel" and "VisionPulse" in dir(vp_gguf)
    with pytest.raises(AttributeError):
        vp_gguf.NoSuchThing  # noqa: B018


# ---- libraries built from this checkout, or a clear refusal ----

def test_installed_libraries_are_built_from_this_checkout():
    from vp_gguf._libdir import lib_dir
    info = _build_info.read(lib_dir())
    assert info and info["source_hash"] == _build_info.source_hash(ROOT)
    assert info["llama_cpp_python"] == fetch.load_lock()["version"]


def test_stale_libraries_are_refused(tmp_path):
    (tmp_path / _build_info.INFO_NAME).write_text('{"source_hash": "0"}')
    with pytest.raises(ImportError, match="make install"):
        _build_info.check(tmp_path)
    with pytest.raises(ImportError, match="not built from this checkout"):
        _build_info.check(tmp_path / "missing")


def test_source_hash_follows_the_cpp_sources(tmp_path):
    for rel in _build_info.SOURCES:
        src = ROOT / rel
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.write_bytes(src.read_bytes())
    assert _build_info.source_hash(tmp_path) == _build_info.source_hash(ROOT)
    f = tmp_path / "cpp" / "src" / "llama-vp-plan.cpp"
    f.write_text(f.read_text() + "\n// changed\n")
    assert _build_info.source_hash(tmp_path) != _build_info.source_hash(ROOT)


# ---- the GGUF writer needs no checkout ----

def test_gguf_writer_is_the_pinned_trees_version():
    import gguf
    from importlib.metadata import version
    tree = re.search(r'^version = "([^"]+)"', (fetch.TREE / "gguf-py" / "pyproject.toml").read_text(), re.M)
    pin = re.search(r'"gguf==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert tree and pin and tree.group(1) == pin.group(1) == version("gguf")
    assert fetch.TREE not in Path(gguf.__file__).resolve().parents


def test_no_machine_paths_in_the_repo():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"(?<![\w.])/(?:home|root|Users|tmp/dl|work)/[\w.-]+")
    hits = []
    for name in files:
        p = ROOT / name
        if p.suffix in (".png", ".gif", ".gguf", ".patch") or not p.is_file():
            continue
        text = p.read_text(errors="replace")
        hits += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits, hits


# ---- the fetch step: outside build isolation, offline, older Pythons ----

def test_pip_is_found_from_inside_an_isolated_build_env(tmp_path):
    # what pip's build isolation does: a sitecustomize on PYTHONPATH that hides site-packages
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n")
    code = ("import importlib.util, sys; assert importlib.util.find_spec('pip') is None, 'not isolated'; "
            "import fetch_llama_cpp as f; print(f.pip_command())")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "scripts")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() not in ("", "None")


def test_no_network_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "CACHE", tmp_path)
    monkeypatch.delenv(fetch.ENV_SDIST, raising=False)
    for k in list(os.environ):
        if k.startswith("PIP_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    with pytest.raises(fetch.FetchError) as e:
        fetch.download_sdist(fetch.load_lock())
    msg = str(e.value)
    assert "could not download" in msg and "\n" not in msg


def test_a_given_sdist_is_used_and_checked(tmp_path, monkeypatch):
    bad = tmp_path / "elsewhere.tar.gz"
    bad.write_bytes(b"not it")
    monkeypatch.setenv(fetch.ENV_SDIST, str(bad))
    with pytest.raises(fetch.FetchError, match="sha256 mismatch"):
        fetch.download_sdist(fetch.load_lock())


def _tar(tmp_path: Path, members: dict[str, str | tuple[str, str]]) -> Path:
    src = tmp_path / "x.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):  # a symlink
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                data = content.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return src


@pytest.mark.parametrize("has_filter", [True, False])
def test_extraction_is_safe_with_and_without_tarfile_filters(tmp_path, monkeypatch, has_filter):
    if not has_filter:  # Python < 3.10.12 / 3.11.4 (e.g. Debian 12's 3.11.2)
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    src = _tar(tmp_path, {"top/sub/a.txt": "a", "top/sub/../../evil.txt": "x", "top/sub/link": ("sym", "../../etc"),
                          "top/sub/ok": ("sym", "a.txt")})
    n = fetch._extract(src, "top/sub/", tmp_path / "out")
    assert n == 2 and (tmp_path / "out" / "a.txt").read_text() == "a"
    assert (tmp_path / "out" / "ok").is_symlink()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "link").exists()


# ---- the first command stops early, in one line, on a machine that lacks something ----

def test_bootstrap_says_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(bootstrap, "min_python", lambda: (99, 0))
    with pytest.raises(SystemExit) as e:
        bootstrap.check_python()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Python 99.0 or newer is needed" in err and err.count("\n") == 1
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        bootstrap.check_tools()
    err = capsys.readouterr().err
    assert "no C/C++ compiler" in err and "build-essential" in err and err.count("\n") == 1


def test_bootstrap_reads_pyproject():
    req = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert req and bootstrap.min_python() == (int(req.group(1)), int(req.group(2)))
    assert any(r.startswith("scikit-build-core") for r in bootstrap.build_requirements())
    assert not any(r.startswith("pip") for r in bootstrap.build_requirements())  # the fetch needs no pip inside


# ---- pip install as Python users do it: build isolation on, a fresh venv ----

def _copy_of_the_tree(dst: Path) -> Path:
    """The working tree as git would hand it over (tracked and new files), plus the fetched sdist."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in names:
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    lock = fetch.load_lock()
    (dst / "third_party" / ".cache").mkdir(parents=True, exist_ok=True)
    shutil.copy2(fetch.CACHE / lock["sdist"], dst / "third_party" / ".cache" / lock["sdist"])
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("route", ["checkout", "sdist"])
def test_pip_install_in_a_fresh_venv_gives_a_working_cli(tmp_path, tiny_paths, images, route):
    """`pip install .` (isolated build) or `pip install` of the sdist `python -m build` makes:
    llama.cpp compiled once, by us, and `import llama_cpp` on our libraries."""
    src = _copy_of_the_tree(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = _newcomer_env(tmp_path)
    target = str(src)
    if route == "sdist":
        subprocess.run([str(py), "-m", "pip", "install", "-q", "build"], check=True, env=env)
        r = subprocess.run([str(py), "-m", "build", "--sdist", "-o", str(tmp_path / "dist"), str(src)],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        (target,) = [str(p) for p in (tmp_path / "dist").glob("vp_gguf-*.tar.gz")]
        assert Path(target).stat().st_size > 50e6  # it carries the pinned llama.cpp sdist
    r = subprocess.run([str(py), "-m", "pip", "install", "-v", target], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    built = re.findall(r"Building wheel for ([\w.-]+)", r.stdout)
    assert built == ["vp-gguf"] or set(built) == {"vp-gguf"}, built  # llama-cpp-python's build never runs
    code = ("import importlib.metadata as md, os, llama_cpp, vp_gguf._libdir as d\n"
            "assert os.environ['LLAMA_CPP_LIB_PATH'] == str(d.lib_dir()), os.environ['LLAMA_CPP_LIB_PATH']\n"
            "try:\n    md.version('llama-cpp-python')\nexcept md.PackageNotFoundError:\n    pass\n"
            "else:\n    raise SystemExit('llama-cpp-python was installed from the index')\n")
    r = subprocess.run([str(py), "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, mmproj = tiny_paths("qwen2vl")
    r = subprocess.run([str(venv / "bin" / "vp-gguf"), "run", "-m", str(model), "--mmproj", str(mmproj),
                        "--image", str(images["a"]), "-p", "Describe.", "-n", "4", "--visionpulse", "5", "--json"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["n_generated"] == 4
