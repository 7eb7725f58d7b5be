"""The report folder while an evaluation runs: its writability checked first, and one file per
finished run, so a long evaluation keeps what it has done and a rerun reuses it.

    check_output_folder(out)                  # before anything loads: OutputError if unwritable
    store = RunStore(out, settings)           # settings: what decides every run's result
    found = store.load("mtp/b8", k=3)         # a FinishedRun, or None (absent or other settings)
    store.save("mtp/b8", 3, run, tokens, records, stop_tokens)

`OUT/runs/<method>_b<B>[_continuous].json` holds the run record (report.json's `runs` entry),
the generated ids per prompt, the per-row step records of draft-and-verify runs, the stop id
each row ended on, the settings it was made under and their fingerprint (sha256 of the settings
as sorted JSON). "Same settings" is everything that decides a run's tokens or its timing: the
trunk and heads files (config / conversion / heads.json text and the params folders' mtimes),
the prompt ids, stop ids, max new tokens, bucket, dtype, platform and device kind, the drafting
options, the run's own key and k. A file whose fingerprint differs is recomputed and replaced;
files are written to a temporary name and renamed, so a run file is always a whole run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from gptk_jax.errors import GptkError

RUNS_DIR = "runs"
RUN_FORMAT = 1


class OutputError(GptkError, ValueError):
    """A report folder that cannot be written."""


def check_output_folder(out) -> None:
    """Raises OutputError unless `out` is a writable folder or can be created as one. Creates
    nothing: it probes the nearest existing folder with a temporary file."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out}: exists and is not a folder: give a folder path "
                          "for the report")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"--output {out}: cannot be created ({probe} is not a folder): "
                          "choose a path whose folders are folders")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        from gptk_jax.files import os_error_reason
        raise OutputError(f"--output {out}: {probe} is not writable: "
                          f"{os_error_reason(e, probe, folder=True)}") from None


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def folder_fingerprint(folder, files: tuple, params_dir: str = "params") -> dict:
    """What identifies a model or heads folder's content without hashing its weights: the sha256
    of its small JSON files and the params folder's mtime (rewritten on every save)."""
    folder = Path(folder).absolute()
    found = {}
    for name in files:
        path = folder / name
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    params = folder / params_dir
    found[params_dir + "_mtime_ns"] = params.stat().st_mtime_ns if params.exists() else None
    return {"path": str(folder), **found}


@dataclasses.dataclass
class FinishedRun:
    run: dict
    tokens: list
    records: Optional[list]
    stop_tokens: Optional[list]


class RunStore:
    """Finished runs under `folder`/runs (no folder: nothing is kept)."""

    def __init__(self, folder, settings: dict):
        self.folder = None if folder is None else Path(folder)
        self.settings = settings
        self.reused: list[str] = []

    def with_settings(self, **extra) -> "RunStore":
        """The same folder (and `reused` list) with settings that only some runs depend on."""
        store = RunStore(self.folder, {**self.settings, **extra})
        store.reused = self.reused
        return store

    def _file(self, key: str) -> Path:
        return self.folder / RUNS_DIR / (key.replace("/", "_") + ".json")

    def _settings(self, key: str, k: int) -> dict:
        return {**self.settings, "run": key, "k": k}

    def load(self, key: str, k: int) -> Optional[FinishedRun]:
        """The stored run when it was made under the same settings, else None (and why)."""
        if self.folder is None or not self._file(key).is_file():
            return None
        wanted = self._settings(key, k)
        try:
            stored = json.loads(self._file(key).read_text(encoding="utf-8"))
            same = stored.get("fingerprint") == sha256_json(wanted)
        except (OSError, ValueError, AttributeError):
            print(f"{key}: {self._file(key)} is unreadable; recomputing", flush=True)
            return None
        if not same:
            old = stored.get("settings") or {}
            changed = sorted(n for n in set(old) | set(wanted) if old.get(n) != wanted.get(n))
            print(f"{key}: settings changed since {self._file(key)} ({', '.join(changed)}); "
                  f"recomputing", flush=True)
            return None
        self.reused.append(key)
        print(f"{key}: reusing {self._file(key)} (same settings)", flush=True)
        return FinishedRun({**stored["run"], "reused": True}, stored["tokens"],
                           stored.get("records"), stored.get("stop_tokens"))

    def save(self, key: str, k: int, run: dict, tokens: list, records: Optional[list] = None,
             stop_tokens: Optional[list] = None) -> None:
        if self.folder is None:
            return
        settings = self._settings(key, k)
        body = {"format": RUN_FORMAT, "fingerprint": sha256_json(settings),
                "settings": settings, "run": run, "tokens": tokens, "records": records,
                "stop_tokens": stop_tokens}
        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(body, default=_plain) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _plain(value):
    """numpy scalars and arrays in run records -> JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
