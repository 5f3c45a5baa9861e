"""The pinned, patched llama.cpp tree and the patch queue."""
from __future__ import annotations

import json

import pytest

import fetch_llama_cpp as fetch

SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


def test_lock_pins_the_issue_hash():
    lock = json.loads(fetch.LOCK.read_text())
    assert lock["sha256"] == SDIST_SHA256
    assert lock["version"] == "0.3.36" and lock["llama_cpp_commit"] == "0c1e570"


def test_tree_is_up_to_date_and_patched():
    assert fetch.TREE.joinpath("include", "llama.h").exists()
    stamp = (fetch.TREE / ".git" / fetch.STAMP_NAME).read_text().strip()
    assert stamp == fetch.wanted_stamp(fetch.load_lock())
    applied = fetch.git("log", "--format=%s", f"{fetch.PRISTINE_TAG}..HEAD").splitlines()
    assert len(applied) == len(fetch.patch_files())


def test_hash_mismatch_is_a_hard_error(tmp_path, monkeypatch):
    bogus = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    bogus.write_bytes(b"not the pinned sdist")
    monkeypatch.setattr(fetch, "CACHE", tmp_path)
    monkeypatch.delenv(fetch.ENV_SDIST, raising=False)
    lock = dict(fetch.load_lock())

    def fake_pip(cmd, **kw):  # the index serves a different file
        class R:
            returncode, stdout, stderr = 0, "", ""
        return R()
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip)
    with pytest.raises(fetch.FetchError, match="sha256 mismatch"):
        fetch.download_sdist(lock)
    assert not bogus.exists()  # the bad file is not kept


def test_ensure_is_idempotent():
    assert fetch.ensure() == fetch.TREE  # up to date: nothing to do
    assert fetch.python_layer_ok(fetch.load_lock())
    assert (fetch.PYLAYER / "llama_cpp" / "llama_cpp.py").is_file()


def test_the_cpu_backend_is_built_without_amx():
    """Upstream's AMX mul_mat segfaults on Q4_K weights (llama.cpp#20824): CMakeLists.txt turns AMX off."""
    from vp_gguf._libs import llama_cpp as L
    info = L.llama_print_system_info().decode()
    assert "CPU :" in info, info
    assert "AMX_INT8 = 1" not in info, info
