"""Resumable runs: one SQLite file per run directory, one committed row per decided input.

`run.sqlite` holds the run's configuration (stored once, with its hash) and one record per
input, keyed by the input's index. Each `put` is its own transaction, so a run killed at any
point keeps every record committed before the kill and never a partial one. A second `put` of
the same index is a no-op when the record is identical and refused (ValueError) when it
differs, unless `replace=True`: a committed decision is never silently overwritten.
The kept proofs of certified outcomes (`verifier.engine.proof`) go to a table of their own,
committed
with their record.

`write_atomic` is how every output file of a run is written: temp file, fsync, rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path

from verifier.errors import InputError
from verifier.run.records import InputRecord

DB_NAME = "run.sqlite"
STORE_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (idx INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS proofs (
    idx INTEGER NOT NULL, model TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (idx, model)
);
"""
# An outcome's detail key holding its kept proof (verifier.engine.proof, as ASCII): stored in the
# proofs table as bytes, not in the record (results.json stays small).
PROOF_KEY = "proof"


def canonical_json(obj: object) -> str:
    """Key-sorted compact JSON (paths and other objects as strings): stable for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict) -> str:
    """SHA-256 of the canonical JSON of a configuration."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _flatten(obj: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts as {"a.b": value}, for naming the keys two configurations differ in."""
    if isinstance(obj, dict) and obj:
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def config_diff(old: dict, new: dict) -> list[str]:
    """One line per key whose value differs between two configurations ("key: old -> new")."""
    a, b = _flatten(json.loads(canonical_json(old))), _flatten(json.loads(canonical_json(new)))

    def show(flat: dict, key: str) -> str:
        return json.dumps(flat[key]) if key in flat else "(absent)"

    return [
        f"{key}: {show(a, key)} -> {show(b, key)}"
        for key in sorted(a.keys() | b.keys())
        if key not in a or key not in b or a[key] != b[key]
    ]


class RunStore:
    """The records of one run directory, committed one input at a time (see module docstring)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    # -- opening ----------------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return conn

    @classmethod
    def create(cls, run_dir: str | Path, config: dict) -> RunStore:
        """A new store in `run_dir` (created if needed); refuses a directory holding a run.

        The file is built aside (schema and configuration) and renamed into place, so a run
        killed while creating it leaves either no `run.sqlite` or a complete one."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / DB_NAME
        if path.exists():
            raise InputError(
                f"{run_dir} already holds a run ({DB_NAME}): pass --resume to "
                "continue it, or choose another output directory"
            )
        text = canonical_json(config)
        for stale in run_dir.glob(f".{DB_NAME}.*.tmp"):  # left by a run killed while creating
            with contextlib.suppress(OSError):
                stale.unlink()
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{DB_NAME}.", suffix=".tmp")
        os.close(fd)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=DELETE")  # one file to rename, no WAL beside it
                conn.executescript(_SCHEMA)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("config", text),
                        ("config_hash", hashlib.sha256(text.encode()).hexdigest()),
                        ("store_version", str(STORE_VERSION)),
                    ],
                )
            finally:
                conn.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.link(tmp, path)  # fails if another run created the store meanwhile
        except FileExistsError:
            raise InputError(
                f"{run_dir} already holds a run ({DB_NAME}): pass --resume to "
                "continue it, or choose another output directory"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _fsync_dir(run_dir)
        return cls(path, cls._connect(path))

    @classmethod
    def open(
        cls, run_dir: str | Path, config: dict | None = None, ignore: Iterable[str] = ()
    ) -> RunStore:
        """The store of an existing run; with `config`, refuses one started with another config.

        `ignore` names top-level config keys that may differ on resume (e.g. output options).
        """
        path = Path(run_dir) / DB_NAME
        if not path.is_file():
            raise InputError(f"nothing to resume: {run_dir} holds no {DB_NAME}")
        try:
            store = cls(path, cls._connect(path))
            stored = store._meta("config")
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{path} is not a readable run store: {exc}") from exc
        if stored is None:
            store.close()
            raise InputError(
                f"{path} holds no configuration (the run stopped before it started);"
                " delete it and start again"
            )
        if config is not None:
            skip = set(ignore)
            old = {k: v for k, v in json.loads(stored).items() if k not in skip}
            new = {k: v for k, v in config.items() if k not in skip}
            diff = config_diff(old, new)
            if diff:
                store.close()
                raise InputError(
                    f"cannot resume {run_dir}: it was started with a different "
                    "configuration:\n  " + "\n  ".join(diff)
                )
        return store

    # -- metadata ---------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @property
    def config(self) -> dict:
        """The configuration stored when the run was created."""
        return json.loads(self._meta("config") or "{}")

    @property
    def config_hash(self) -> str:
        return self._meta("config_hash") or ""

    def set_config(self, config: dict) -> None:
        """Store `config` as the run's configuration (a resume that widened an option which
        only lets more be decided: `--quantized-timeout`)."""
        with self._transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("config", canonical_json(config)), ("config_hash", config_hash(config))],
            )

    # -- records ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self):
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def put(self, record: InputRecord, replace: bool = False) -> None:
        """Commit one input's record (identical re-put: no-op; a different one needs `replace`)."""
        self.put_many([record], replace)

    def put_many(self, records: list[InputRecord], replace: bool = False) -> None:
        """Commit several inputs' records in one transaction (one sync for a cluster's chunk),
        each as `put` would: all of them or, on an error, none."""
        with self._transaction():
            for record in records:
                self._put_one(record, replace)

    def _put_one(self, record: InputRecord, replace: bool) -> None:
        doc, proofs = _split_proofs(record.to_dict())
        text = canonical_json(doc)
        row = self._conn.execute(
            "SELECT data FROM records WHERE idx = ?", (record.index,)
        ).fetchone()
        if row is None:
            self._conn.execute(
                "INSERT INTO records (idx, data) VALUES (?, ?)", (record.index, text)
            )
        elif row[0] != text:
            if not replace:
                raise ValueError(
                    f"input {record.index} is already recorded with a different "
                    "result; pass replace=True to overwrite it"
                )
            self._conn.execute("UPDATE records SET data = ? WHERE idx = ?", (text, record.index))
        self._conn.executemany(
            "INSERT OR REPLACE INTO proofs (idx, model, data) VALUES (?, ?, ?)",
            [(record.index, name, data) for name, data in proofs.items()],
        )

    def get(self, index: int) -> InputRecord | None:
        """The record of one input, or None if it is not decided yet."""
        row = self._conn.execute("SELECT data FROM records WHERE idx = ?", (index,)).fetchone()
        return None if row is None else InputRecord.from_dict(json.loads(row[0]))

    def done_indices(self) -> set[int]:
        """Indices of the inputs already decided (skipped on resume)."""
        return {r[0] for r in self._conn.execute("SELECT idx FROM records")}

    def records(self) -> list[InputRecord]:
        """Every committed record, ordered by input index."""
        rows = self._conn.execute("SELECT data FROM records ORDER BY idx")
        return [InputRecord.from_dict(json.loads(r[0])) for r in rows]

    def proofs(self) -> dict[tuple[int, str], bytes]:
        """Every kept proof, keyed by (input index, model name)."""
        rows = self._conn.execute("SELECT idx, model, data FROM proofs")
        return {(int(i), str(m)): bytes(d) for i, m, d in rows}

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_proofs(doc: dict) -> tuple[dict, dict[str, bytes]]:
    """A record's dict without its outcomes' proofs, and the proofs (model name -> bytes)."""
    from verifier.engine.proof import from_text
    from verifier.run.records import FLOAT

    proofs: dict[str, bytes] = {}
    named = [(FLOAT, doc.get("float")), *doc.get("quantized", {}).items()]
    for name, o in named:
        if o and PROOF_KEY in o.get("detail", {}):
            proofs[name] = from_text(o["detail"].pop(PROOF_KEY))
    return doc, proofs


def check_same_model(run_dir: str | Path, sha256: str) -> None:
    """On resume, refuse a model other than the one the run's stores were started with.

    Checked before any work, so that nothing (the quantized copies in RUN/models) is rebuilt
    over the run's files from another model. Stores without a readable configuration are left
    to `RunStore.open`, which names their problem.
    """
    run_dir = Path(run_dir)
    for db in sorted([run_dir / DB_NAME, *run_dir.glob(f"*/{DB_NAME}")]):
        if not db.is_file():
            continue
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
            old = json.loads(row[0]).get("model_sha256") if row else None
        except (sqlite3.Error, ValueError, AttributeError):
            continue
        if old is not None and old != sha256:
            diff = config_diff({"model_sha256": old}, {"model_sha256": sha256})
            raise InputError(
                f"cannot resume {run_dir}: it was started with a different model (its graph "
                "or weights changed):\n  " + "\n  ".join(diff)
            )


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` all-or-nothing: temp file in the same directory, fsync, rename."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
