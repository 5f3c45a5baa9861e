"""`vp-gguf fetch` and `vp-gguf models`: models from the hub, and what is cached here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .cli_common import EXAMPLE


def _add_fetch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch",
        help="download a model and its mmproj from the Hugging Face hub",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="catalog name (see `vp-gguf models`) or owner/repo[:QUANT]")
    p.add_argument("-q", "--quant", default=None, help="quantization, e.g. Q4_K_M, Q8_0, F16")
    p.add_argument("--revision", default="main")
    p.add_argument("--json", action="store_true", help="print the paths as JSON")
    m = sub.add_parser(
        "models",
        help="the catalog of known-good models and what is fetched here; `models rm NAME` deletes one",
    )
    _add_list_flags(m)
    ms = m.add_subparsers(dest="models_command", metavar="{list,rm}")
    _add_list_flags(ms.add_parser("list", help="the same as `vp-gguf models`"))
    rm = ms.add_parser("rm", help="delete a fetched model and its mmproj from the hub cache")
    rm.add_argument(
        "name",
        help="catalog name or owner/repo (every quantization fetched), or NAME:QUANT (that one)",
    )


def _add_list_flags(p: argparse.ArgumentParser) -> None:
    # no default (SUPPRESS): `models --json list` keeps the flag the subcommand's default would reset
    p.add_argument(
        "--online",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also ask the hub for each default pair's files and sizes",
    )
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the rows as JSON")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _run_name(a: argparse.Namespace) -> str:
    """The NAME[:QUANT] that `vp-gguf run --hf` resolves to what `fetch` just fetched."""
    base = a.name.partition(":")[0] if a.quant else a.name
    return f"{base}:{a.quant}" if a.quant else a.name


def cmd_fetch(a: argparse.Namespace) -> int:
    from .fetch import fetch

    m = fetch(a.name, a.quant, a.revision, progress=not a.json)
    if a.json:
        print(json.dumps({"repo": m.repo, "quant": m.quant, "model": str(m.model_path), "mmproj": str(m.mmproj_path)}))
        return 0
    real = {os.path.realpath(p) for p in (m.model_path, m.mmproj_path)}
    print(f"{m.repo} ({m.quant}): {m.model_path.name} + {m.mmproj_path.name}, {_size(sum(map(_bytes, real)))}")
    if a.revision == "main":
        hint = f"vp-gguf run --hf {_run_name(a)} --image IMAGE -p PROMPT"
    else:  # --hf fetches the main revision: name the files
        hint = f"vp-gguf run -m {m.model_path} --mmproj {m.mmproj_path} --image IMAGE -p PROMPT"
    print(f"run it: {hint}", file=sys.stderr)
    return 0


def _bytes(path: str) -> int:
    return os.stat(path).st_size


def cmd_models(a: argparse.Namespace) -> int:
    if a.models_command == "rm":
        return _cmd_rm(a)
    return _cmd_list(getattr(a, "online", False), getattr(a, "json", False))


def _cmd_rm(a: argparse.Namespace) -> int:
    from .fetched import remove

    removed, freed = remove(a.name)
    for p in removed:
        print(f"removed {p.name} ({p.model} + {p.mmproj})")
    print(f"freed {_size(freed)}" + ("" if freed else " (its files are still used by another fetched model)"))
    return 0


def _rows() -> list[dict[str, Any]]:
    """The catalog, each entry with what is fetched of it; then the repos fetched by name."""
    from .catalog import CATALOG
    from .fetched import fetched_pairs

    pairs = fetched_pairs()

    def fetched(repo: str) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "quant": p.quant,
                "revision": p.revision,
                "model": str(p.model_path),
                "mmproj": str(p.mmproj_path),
                "size_bytes": p.size_bytes(),
            }
            for p in pairs
            if p.repo == repo
        ]

    rows: list[dict[str, Any]] = [
        {"name": e.name, "repo": e.repo, "family": e.family, "quants": list(e.quants), "default": e.default_quant}
        | {"note": e.note, "fetched": fetched(e.repo)}
        for e in CATALOG
    ]
    known = {e.repo for e in CATALOG}
    for repo in dict.fromkeys(p.repo for p in pairs if p.repo not in known):
        rows.append(
            {"name": repo, "repo": repo, "family": None, "quants": [], "default": None}
            | {"note": "fetched by repo name", "fetched": fetched(repo)}
        )
    for r in rows:
        r["cached"] = sorted({f["quant"] for f in r["fetched"]})
    return rows


def _cmd_list(online: bool, as_json: bool) -> int:
    from .fetch import FetchError, choose_files, remote_files

    rows = _rows()
    if online:
        for r in rows:
            if r["default"] is None:
                continue
            try:
                files = remote_files(r["repo"])
                mf, mm, _ = choose_files(list(files), r["default"])
                r["files"] = {"model": mf, "mmproj": mm}
                r["size_bytes"] = (files[mf].size or 0) + (files[mm].size or 0)
            except FetchError as e:
                r["error"] = str(e)
    if as_json:
        print(json.dumps(rows))
        return 0
    catalog = [r for r in rows if r["default"] is not None]
    print(
        f"{'name':<22} {'repo':<44} {'quants (default first)':<24} {'cached':<8}" + ("  size  files" if online else "")
    )
    for r in catalog:
        qs = [r["default"]] + [q for q in r["quants"] if q != r["default"]]
        line = f"{r['name']:<22} {r['repo']:<44} {','.join(qs):<24} {','.join(r['cached']) or '-':<8}"
        if online:
            line += (
                f"  {_size(r['size_bytes'])}  {r['files']['model']} + {r['files']['mmproj']}"
                if "files" in r
                else f"  ({r['error'][:60]})"
            )
        print(line)
    _print_fetched([f for r in rows for f in r["fetched"]])
    print(
        "\nvp-gguf fetch NAME [--quant Q] downloads one (sizes and files come from the hub); "
        "any other repo works as owner/repo[:QUANT]; vp-gguf models rm NAME deletes one.",
        file=sys.stderr,
    )
    return 0


def _print_fetched(fetched: list[dict[str, Any]]) -> None:
    from huggingface_hub import constants

    if not fetched:
        print(f"\nnothing fetched here yet (hub cache: {constants.HF_HUB_CACHE})")
        return
    # a file shared by two pairs (one mmproj for every quantization) takes its room once
    total = sum(map(_bytes, {os.path.realpath(f[k]) for f in fetched for k in ("model", "mmproj")}))
    print(f"\nfetched here: {len(fetched)}, {_size(total)} (hub cache: {constants.HF_HUB_CACHE})")
    width = max(len(f["name"]) for f in fetched) + 2
    for f in fetched:
        files = f"{Path(f['model']).name} + {Path(f['mmproj']).name}"
        rev = "" if f["revision"] == "main" else f" (revision {f['revision']})"
        print(f"{f['name']:<{width}} {_size(f['size_bytes']):>10}  {files}{rev}")
