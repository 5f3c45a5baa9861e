"""`vp-gguf fetch` and `vp-gguf models`: models from the hub, and what is cached here."""

from __future__ import annotations

import argparse
import json
import sys
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
    m = sub.add_parser("models", help="the catalog of known-good models, and what is cached here")
    m.add_argument("--online", action="store_true", help="also ask the hub for each default pair's files and sizes")
    m.add_argument("--json", action="store_true")


def cmd_fetch(a: argparse.Namespace) -> int:
    from .fetch import fetch

    m = fetch(a.name, a.quant, a.revision)
    if a.json:
        print(json.dumps({"repo": m.repo, "quant": m.quant, "model": str(m.model_path), "mmproj": str(m.mmproj_path)}))
    else:
        print(f"{m.repo} ({m.quant})\n  model:  {m.model_path}\n  mmproj: {m.mmproj_path}")
        print(
            f"run it: vp-gguf run -m {m.model_path} --mmproj {m.mmproj_path} --image IMAGE -p PROMPT", file=sys.stderr
        )
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .catalog import CATALOG
    from .fetch import FetchError, cached, choose_files, remote_files

    rows: list[dict[str, Any]] = [
        {
            "name": e.name,
            "repo": e.repo,
            "family": e.family,
            "quants": list(e.quants),
            "default": e.default_quant,
            "cached": cached(e),
            "note": e.note,
        }
        for e in CATALOG
    ]
    if a.online:
        for r in rows:
            try:
                files = remote_files(r["repo"])
                mf, mm, _ = choose_files(list(files), r["default"])
                r["files"] = {"model": mf, "mmproj": mm}
                r["size_bytes"] = (files[mf].size or 0) + (files[mm].size or 0)
            except FetchError as e:
                r["error"] = str(e)
    if a.json:
        print(json.dumps(rows))
        return 0
    print(
        f"{'name':<22} {'repo':<44} {'quants (default first)':<24} {'cached':<8}"
        + ("  size  files" if a.online else "")
    )
    for r in rows:
        qs = [r["default"]] + [q for q in r["quants"] if q != r["default"]]
        line = f"{r['name']:<22} {r['repo']:<44} {','.join(qs):<24} {','.join(r['cached']) or '-':<8}"
        if a.online:
            line += (
                f"  {r['size_bytes'] / 1e9:.2f} GB  {r['files']['model']} + {r['files']['mmproj']}"
                if "files" in r
                else f"  ({r['error'][:60]})"
            )
        print(line)
    print(
        "\nvp-gguf fetch NAME [--quant Q] downloads one (sizes and files come from the hub); "
        "any other repo works as owner/repo[:QUANT].",
        file=sys.stderr,
    )
    return 0
