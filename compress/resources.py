"""Heavy things a run needs — the model folder, the teacher, the tokenizer, token streams —
loaded at most once and only when a stage needs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import DataConfig
from .data import DataSpec, iter_documents
from .sources import SourceRef, check_weights
from .ui import UI


class Resources:
    def __init__(self, source: SourceRef, data_cfg: DataConfig, ui: UI):
        self.source, self.data_cfg, self.ui = source, data_cfg, ui
        self._folder: Path | None = None
        self._teacher = None
        self._tokenizer = None
        self._streams: dict[tuple[str, int | None], Any] = {}

    def folder(self) -> Path:
        if self._folder is None:
            from .models import model_folder

            self._folder = model_folder(self.source, quiet=self.ui.quiet, log=self.ui.log)
            check_weights(self._folder)
        return self._folder

    def teacher(self):
        if self._teacher is None:
            from .models import load_model

            self._teacher = load_model(self.folder())
        return self._teacher

    def tokenizer(self):
        if self._tokenizer is None:
            from .models import load_tokenizer

            self._tokenizer = load_tokenizer(self.folder())
        return self._tokenizer

    def stream(self, spec: DataSpec, max_tokens: int | None = None):
        """Token stream of a data source, tokenized once per run (every stage shares it)."""
        from .data import ensure_self_data, token_stream

        key = (spec.fingerprint, max_tokens)
        if key not in self._streams:
            if spec.kind == "self":
                ensure_self_data(spec, self.data_cfg, self.teacher(), self.tokenizer(), self.ui.progress,
                                 log=self.ui.log)
            self._streams[key] = token_stream(iter_documents(spec), self.tokenizer(), max_tokens, label=spec.label)
        return self._streams[key]
