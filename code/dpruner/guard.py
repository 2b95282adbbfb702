"""The input/output guard every CLI runs before heavy work.

An output that is, contains, or lies inside an input (model, scores, importance, data) is refused even
with `--overwrite`, because replacing it would destroy the input. The output location must be usable
(its nearest existing ancestor a writable folder, the target itself not a file where a folder is meant),
checked by creating and removing a probe file, so a read-only location fails in seconds, not after the
run. Folders a failed run created and left empty are removed again (`cleanup_created`, called by
`cli.run`), and stale temporaries of killed runs inside the outputs are swept.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dpruner.errors import DPrunerError
from dpruner.io import remove_stale_temps, temp_prefix

# Folders this process created for its outputs (topmost new ancestor of each), newest last.
_created: list[Path] = []


@dataclass(frozen=True)
class Output:
    """One output of a command: what to call it in messages, where, and whether it is a folder."""

    label: str
    path: str | os.PathLike | None
    folder: bool = True


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def model_input(name: str | None) -> Path | None:
    """The local folder or file behind a model argument (None for a hub id)."""
    if not name:
        return None
    from dpruner.models import EMBEDDED_MODEL, embedded_model_dir

    if name == EMBEDDED_MODEL:
        return embedded_model_dir()
    path = Path(name).expanduser()
    return path if path.exists() else None


def model_inputs(model: str | None, data: str | os.PathLike | None = None, **more: str | os.PathLike | None
                 ) -> dict[str, Path | str | os.PathLike | None]:
    """The inputs of a typical command: the model, the data folder, and named extras (scores, ...)."""
    from dpruner.paths import data_dir

    return {"model": model_input(model), "data folder": data_dir(data), **more}


def refuse_overlap(outputs: Iterable[Output], inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """No output may be, contain, or lie inside an input."""
    for output in outputs:
        if not output.path:
            continue
        out = _real(output.path)
        for label, source in inputs.items():
            if not source:
                continue
            src = _real(source)
            if out == src:
                relation = "is"
            elif out in src.parents:
                relation = "contains"
            elif src in out.parents:
                relation = "lies inside"
            else:
                continue
            raise DPrunerError(f"{output.label} {out} {relation} the {label} {src}; an output never replaces or "
                               "enters an input (not even with --overwrite): choose another path")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(output: Output) -> None:
    """The target has the right kind and its location accepts new files (probed, so read-only mounts
    and permissions count as they will for the real write)."""
    target = Path(output.path).expanduser().absolute()
    if target.exists() and output.folder and not target.is_dir():
        raise DPrunerError(f"{output.label} {target} is a file; expected a folder (or a path that does not exist yet)")
    if target.exists() and not output.folder and target.is_dir():
        raise DPrunerError(f"{output.label} {target} is a folder; expected a file path")
    anchor = _nearest_existing(target.parent)
    if not anchor.is_dir():
        raise DPrunerError(f"{output.label} {target}: {anchor} is a file, so nothing can be created below it")
    places = [anchor] + ([target] if output.folder and target.is_dir() else [])
    for place in places:
        try:
            fd, probe = tempfile.mkstemp(prefix=temp_prefix("probe"), suffix=".tmp", dir=place)
        except OSError as err:
            raise DPrunerError(f"{output.label} {target}: cannot write in {place} ({err.strerror}); "
                               "choose a writable location") from None
        os.close(fd)
        os.unlink(probe)


def _note_created(target: Path) -> None:
    top = None
    for path in [target, *target.parents]:
        if path.exists():
            break
        top = path
    if top is not None and top not in _created:
        _created.append(top)


def protect(outputs: Iterable[Output], inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """The whole guard: overlap, writability, stale temporaries; call before any heavy work."""
    outputs = [o for o in outputs if o.path]
    refuse_overlap(outputs, inputs)
    for output in outputs:
        check_writable(output)
    for output in outputs:
        target = Path(output.path).expanduser().absolute()
        remove_stale_temps(target.parent, target.name)
        if output.folder and target.is_dir():
            remove_stale_temps(target, recursive=True)
        _note_created(target if output.folder else target.parent)


def cleanup_created(failed: bool = True) -> None:
    """After a failed run: remove the output folders this process created that hold no file. After a
    successful one (`failed=False`) just forget them."""
    if not failed:
        _created.clear()
    while _created:
        top = _created.pop()
        if not top.is_dir():
            continue
        for root, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(root)
            except OSError:  # not empty: the run left something worth keeping (a resumable state)
                pass
