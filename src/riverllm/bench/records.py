"""The per-run records of a resumable benchmark (`bench --exact`, `bench --llama-cpp`).

samples.jsonl holds one JSON object a line, appended as each run finishes, so an interrupted
benchmark resumes where it stopped: a kill loses at most the run in flight, and no run is repeated.
"""

from __future__ import annotations

import json
from pathlib import Path


class RecordLog:
    def __init__(self, path: Path, key_fields: tuple[str, ...]):
        self.path, self.key_fields = path, key_fields
        self.records: dict[tuple, dict] = {}
        path.parent.mkdir(parents=True, exist_ok=True)  # the benchmark writes its tables beside it
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[self.key(record)] = record

    def key(self, record: dict) -> tuple:
        return tuple(record[field] for field in self.key_fields)

    def __contains__(self, key: tuple) -> bool:
        return key in self.records

    def append(self, record: dict) -> None:
        self.records[self.key(record)] = record
        with open(self.path, "a", encoding="utf-8") as samples:
            samples.write(json.dumps(record) + "\n")
