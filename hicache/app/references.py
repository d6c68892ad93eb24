"""The uncached outputs, rendered once and reused from disk by every run that compares against them.

The key is (model, prompt, seed, steps, size) plus the other call arguments that change the
output (guidance, dtype, call kwargs). Next to each output a JSON file keeps its latency and the
quality metrics measured on it; FLOPs, which do not depend on the prompt, are kept per
(model, steps, size).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .files import temp_file
from .outputs import OutputKind


def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, ".tmp.json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class ReferenceStore:
    def __init__(self, root: str | Path, output: OutputKind, model_key: dict[str, Any]):
        self.root = Path(root)
        self.output = output
        self.model_key = model_key

    def key(self, prompt: str, seed: int) -> str:
        return digest({**self.model_key, "prompt": prompt, "seed": seed})

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}{self.output.suffix}", folder / f"{key}.json"

    def get(self, prompt: str, seed: int) -> tuple[Any, dict] | None:
        out_path, meta_path = self._paths(self.key(prompt, seed))
        if not (out_path.is_file() and meta_path.is_file()):
            return None
        return self.output.load(out_path), read_json(meta_path)

    def put(self, prompt: str, seed: int, output: Any, meta: dict) -> None:
        out_path, meta_path = self._paths(self.key(prompt, seed))
        self.output.save(output, out_path)
        write_json_atomic(meta_path, {**meta, "prompt": prompt, "seed": seed, "key": self.model_key})

    def update_meta(self, prompt: str, seed: int, meta: dict) -> None:
        _, meta_path = self._paths(self.key(prompt, seed))
        write_json_atomic(meta_path, meta)

    @property
    def _flops_path(self) -> Path:
        return self.root / "flops" / f"{digest(self.model_key)}.json"

    def flops(self) -> int | None:
        return read_json(self._flops_path)["flops"] if self._flops_path.is_file() else None

    def put_flops(self, flops: int) -> None:
        write_json_atomic(self._flops_path, {"flops": flops, "key": self.model_key})
