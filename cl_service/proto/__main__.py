"""``python -m cl_service.proto``: regenerate the committed cl.v1 stubs after an edit of ``cl.proto``."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cl_service._atomic import atomic_write_text
from cl_service.proto import PROTO_DIR, STUBS, generate


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = generate(tmp)
        for name in STUBS:
            atomic_write_text(PROTO_DIR / name, (Path(folder) / name).read_text())
            print(PROTO_DIR / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
