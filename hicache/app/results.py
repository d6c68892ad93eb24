"""One run's folder, `outputs/<experiment>/<run>/`, written so that a kill loses nothing.

- ``images/<index>.png``: each output, written to a temporary file and renamed;
- ``progress/rank<r>.jsonl``: one line per finished output, appended and fsynced by each process,
  so a restarted run skips what is already there (a torn last line is ignored);
- ``metrics.jsonl`` and ``summary.json``: written atomically by rank 0 when every output is in;
  ``summary.json`` marks the run finished, and re-running the sweep skips it.

The config fingerprint is stored with the run: a folder that holds a different config is an error,
never silently reused. The claim is atomic: ``fingerprint.json`` is written to a temporary file and
hard-linked into place, which fails if the name exists, so of two processes with different configs
exactly one gets the folder (two with the same config share it, each rendering what is missing). A
run that stops before its first output releases the claim (`release`), so the corrected command runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import SetupError
from .files import temp_file
from .references import read_json, write_json_atomic


class RunDir:
    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def output_path(self, index: int, suffix: str) -> Path:
        return self.path / "images" / f"{index:05d}{suffix}"

    @property
    def marker_path(self) -> Path:
        return self.path / "fingerprint.json"

    def claim(self) -> None:
        """Create the folder for this config, or check that an existing one holds the same config."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(self.path, ".tmp.claim")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": self.fingerprint}, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.marker_path)  # atomic, and fails if another process claimed the folder first
            return
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        found = read_json(self.marker_path)["fingerprint"]
        if found != self.fingerprint:
            state = "its outputs" if self.has_outputs() else "no outputs yet (another process may be starting it)"
            raise SetupError(
                f"{self.path} holds a run with a different config (fingerprint {found} != {self.fingerprint}) and "
                f"{state}; delete it, or pick another name=/run_name="
            )

    def has_outputs(self) -> bool:
        return bool(self.records()) or (self.path / "images").is_dir() and any((self.path / "images").iterdir())

    def release(self) -> None:
        """Undo `claim` if the run left nothing behind (it stopped at a setup error before its first output)."""
        if self.has_outputs() or self.summary_path.is_file() or not self.marker_path.is_file():
            return
        if read_json(self.marker_path).get("fingerprint") != self.fingerprint:
            return
        for name in ("fingerprint.json", "latency.json", "flops.json"):
            (self.path / name).unlink(missing_ok=True)
        for folder in (self.path / "images", self.path / "progress", self.path):
            try:
                folder.rmdir()  # only if empty
            except OSError:
                pass

    def finished(self) -> bool:
        return self.summary_path.is_file() and read_json(self.summary_path).get("fingerprint") == self.fingerprint

    def summary(self) -> dict:
        return read_json(self.summary_path)

    def _progress_path(self, rank: int) -> Path:
        return self.path / "progress" / f"rank{rank}.jsonl"

    def append(self, rank: int, record: dict[str, Any]) -> None:
        path = self._progress_path(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.is_file() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n" if torn else "") + json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> dict[int, dict]:
        """Every finished output's record, by index, from the merged file and every rank's progress."""
        found: dict[int, dict] = {}
        files = [self.metrics_path, *sorted((self.path / "progress").glob("rank*.jsonl"))]
        for path in files:
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill; that output is rendered again
                found[int(record["index"])] = record
        return found

    def write_final(self, records: list[dict], summary: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(self.path, ".tmp.jsonl")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in sorted(records, key=lambda r: r["index"]):
                f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)
        write_json_atomic(self.summary_path, {**summary, "fingerprint": self.fingerprint})
        for path in (self.path / "progress").glob("rank*.jsonl"):
            path.unlink()
        if (self.path / "progress").is_dir():
            (self.path / "progress").rmdir()
