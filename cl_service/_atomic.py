"""Atomic writes: a file through a temp file + rename, a folder through a staging folder + rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(stage: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished staging folder to ``final``, swapping out an existing ``final`` only at the end."""
    stage, final = Path(stage), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, final)


def write_folder(final: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write a flat folder of files (name -> bytes) through a staging folder next to ``final`` and
    :func:`replace_dir`: readers see the old folder or the whole new one, never a mix."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    for name, data in files.items():
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"{final}: {name!r} is not a plain file name")
        (stage / name).write_bytes(data)
    replace_dir(stage, final)
    return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(final: str | os.PathLike) -> list[Path]:
    """Delete what killed writers of ``final`` left next to it: the ``.<name>.partial-<pid>``, ``.tmp-<pid>``,
    ``.build-<pid>`` and ``.old-<pid>`` staging entries (and ones nested by name, ``..<name>.build-<pid>.tmp-<pid>``)
    whose process no longer runs on this machine. Nothing there was ever used (every write lands by rename);
    this only frees the space. Returns what was removed."""
    import re

    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(r"\.+" + re.escape(final.name) + r"\.(partial|tmp|build|old)-(\d+)")
    gone = []
    for p in final.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone
