#!/usr/bin/env python3
"""Verify and lay out the data files listed in manifest.json (standard library only).

Offline (default): copy each file from a local folder (default ../shared/data, or $DPRUNER_DATA_SOURCE,
or --from DIR), checking its sha256. Online (--online): download each file from the public commit it
was taken from (the `url` in the manifest; the hub holds no byte-identical copy) and check it the same
way. Files already in place with the right checksum are left alone, so rerunning is cheap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
DEFAULT_OUT = HERE / "data"
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "data"


class PrepareError(Exception):
    """One-line, user-fixable problem."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: Path = MANIFEST) -> list[dict]:
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        for entry in files:
            for key in ("name", "path", "sha256", "url"):
                if key not in entry:
                    raise PrepareError(f"{path}: entry {entry.get('name', '?')} lacks the key {key!r}")
        return files
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise PrepareError(f"{path}: not a valid data manifest ({err})") from None


def _fetch(entry: dict, source: Path | None, tmp: Path) -> None:
    if source is None:
        try:
            with urllib.request.urlopen(entry["url"], timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:
            raise PrepareError(f"{entry['path']}: download from {entry['url']} failed ({err})") from None
        return
    origin = source / entry["path"]
    if not origin.is_file():
        raise PrepareError(
            f"{entry['path']}: not found in {source} (pass --from DIR with the data, or --online)")
    shutil.copyfile(origin, tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare(out: Path, source: Path | None, groups: set[str] | None = None,
            manifest: Path = MANIFEST, log=print) -> list[Path]:
    """Make `out` hold every manifest file with the right checksum; return the paths."""
    placed = []
    for entry in load_manifest(manifest):
        group = entry["path"].split("/")[0]
        if groups and group not in groups:
            continue
        target = out / entry["path"]
        if target.is_file() and sha256(target) == entry["sha256"]:
            log(f"ok       {entry['path']}")
            placed.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.dpruner-tmp-{os.getpid()}-", suffix=".tmp",
                                        dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(entry, source, tmp)
            got = sha256(tmp)
            if got != entry["sha256"]:
                origin = entry["url"] if source is None else source / entry["path"]
                raise PrepareError(
                    f"{origin}: sha256 {got} does not match the manifest ({entry['sha256']}); "
                    "the file is corrupt or a different version")
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a data file is an ordinary file
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        log(f"prepared {entry['path']}")
        placed.append(target)
    return placed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", default=None,
                        help="local folder holding legal/, medical/, general/ "
                             f"(default: $DPRUNER_DATA_SOURCE or {DEFAULT_SOURCE})")
    parser.add_argument("--online", action="store_true",
                        help="download from the pinned public sources instead of a local folder")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where to lay the files out")
    parser.add_argument("--only", default="", help="comma-separated groups: legal,medical,general")
    args = parser.parse_args(argv)
    if args.online and args.source:
        parser.error("--from and --online exclude each other")
    source = None if args.online else Path(args.source or os.environ.get("DPRUNER_DATA_SOURCE")
                                           or DEFAULT_SOURCE).expanduser().resolve()
    groups = {g.strip() for g in args.only.split(",") if g.strip()} or None
    unknown = (groups or set()) - {"legal", "medical", "general"}
    try:
        if unknown:
            raise PrepareError(f"--only: unknown group(s) {sorted(unknown)}; expected legal, medical, general")
        placed = prepare(Path(args.out).expanduser().resolve(), source, groups)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(placed)} files verified under {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
