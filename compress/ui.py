"""Progress bars and log lines: always on stderr, silenced by --quiet."""

from __future__ import annotations

import sys
from typing import Any


class UI:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def progress(self, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, disable=self.quiet,
            dynamic_ncols=True, leave=False,
        )
