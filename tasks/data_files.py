"""Training and evaluation data from the files users bring, as rows of named fields.

A data path may be:

| path                                   | read with                                         | a row is named as          |
|----------------------------------------|---------------------------------------------------|----------------------------|
| ``x.jsonl``: one JSON object a line    | ``json`` (no ``datasets`` import: fast)           | ``x.jsonl:LINE``           |
| ``x.json``: JSON lines, or an array    | ``json``                                          | ``x.json:LINE`` / ``row N`` |
| ``x.parquet``                          | ``datasets.load_dataset("parquet", data_files=)`` | ``x.parquet row N``        |
| a ``save_to_disk`` Dataset folder      | ``datasets.load_from_disk``                       | ``DIR row N``              |
| a ``save_to_disk`` DatasetDict folder  | ``datasets.load_from_disk``, then ``split``       | ``DIR split 'S' row N``    |
| a folder of split files                | the files of ``split``: ``S.jsonl``,              | each file's own name       |
|                                        | ``S-00000-of-00002.parquet``, also under ``data/`` |                            |

``split`` (``data.split``) picks one split of a path that holds several; a path that holds
several and no ``split`` is an error naming them. Rows are numbered from 1; JSON lines by
their line in the file. Nothing here reaches a model or dataset hub.

JSON and JSON lines are parsed here rather than by ``datasets``' JSON builder: a bad line
must be named by its number, and importing ``datasets`` (about 1.5-4 s on a laptop CPU)
would otherwise be paid at every stage start for the demo's small JSONL files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")
_TABLE_BATCH_ROWS = 1024


class DataError(ValueError):
    """A data path or row that cannot be used; the message names where it is and the fix."""


@dataclass(frozen=True)
class Record:
    """One row: where it is (file and line, or folder, split and row) and its fields."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class TaskRow:
    """One problem: the bare question (a template is applied later) and its answer."""

    prompt: str
    answer: str
    kind: str = "reasoning"  # prompt type (§2.3.4): reasoning prompts get rule rewards
    where: str = field(default="", compare=False)  # file:line or row number, for messages


@dataclass
class BadRows:
    """Rows skipped instead of failing the read: how many, and the first ``keep`` of them
    (each a message naming the row and the fix)."""

    keep: int = 20
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(message)


def _bad(bad: BadRows | None, message: str) -> None:
    """A bad row: an error, or (collecting into ``bad``) counted and skipped."""
    if bad is None:
        raise DataError(message)
    bad.add(message)


# -- reading --------------------------------------------------------------------------------

def read_records(path: Path, *, split: str | None = None, bad: BadRows | None = None) -> Iterator[Record]:
    """The rows of a data path, in file order; each a JSON object (a dict of fields). With
    ``bad``, a JSON line that is not UTF-8, not JSON or not an object is counted there and
    skipped instead of ending the read."""
    path = Path(path)
    if path.is_dir():
        yield from _read_dir(path, split, bad)
        return
    if not path.is_file():
        raise DataError(f"data path {path} does not exist")
    if split is not None:
        log.warning("data.split=%r is ignored for %s: a single file holds one split "
                    "(remove data.split, or point the path at a folder with splits)", split, path)
    yield from _read_file(path, bad)


def _read_file(path: Path, bad: BadRows | None = None) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_json_lines(path, bad)
    elif suffix == ".json":
        yield from _read_json(path, bad)
    elif suffix == ".parquet":
        yield from _table_records(_load_parquet([path]), str(path))
    else:
        raise DataError(f"{path}: cannot read {suffix or 'a file without a suffix'}; data files are "
                        f"{', '.join(SUFFIXES)} or a folder written by datasets' save_to_disk")


def _read_json_lines(path: Path, bad: BadRows | None = None) -> Iterator[Record]:
    """Line by line, each decoded on its own, so a bad byte names its line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                _bad(bad, f"{path}:{n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                     "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
                continue
            line = line.removeprefix("\ufeff").strip() if n == 1 else line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                _bad(bad, f"{path}:{n}: not valid JSON ({err.msg}); each line must be one JSON object")
                continue
            record = _as_record(obj, f"{path}:{n}", bad)
            if record is not None:
                yield record


def _not_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 is (text mode decodes in chunks, not lines)."""
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return (f"{path}:{n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
    return f"{path}: not UTF-8 text; re-save the file as UTF-8"


def _read_json(path: Path, bad: BadRows | None = None) -> Iterator[Record]:
    """A ``.json`` file: a JSON array of objects, or JSON lines under another suffix."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path)) from None
    if not text.lstrip().startswith("["):
        yield from _read_json_lines(path, bad)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); a .json file holds one "
                        "JSON array of objects, or one object a line") from None
    for n, obj in enumerate(items, 1):
        record = _as_record(obj, f"{path} row {n}", bad)
        if record is not None:
            yield record


def _as_record(obj: Any, where: str, bad: BadRows | None = None) -> Record | None:
    if not isinstance(obj, dict):
        _bad(bad, f"{where}: a row must be a JSON object of fields, got a {_json_type(obj)} "
             f"{_short(obj)}; write one object a row, e.g. {{\"prompt\": ..., \"answer\": ...}}")
        return None
    return Record(where, obj)


# -- folders ------------------------------------------------------------------------------------

def _read_dir(path: Path, split: str | None, bad: BadRows | None = None) -> Iterator[Record]:
    if (path / "dataset_dict.json").is_file():  # a DatasetDict written by save_to_disk
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        _check_split(path, split, splits)
        yield from _table_records(_load_from_disk(path)[split], f"{path} split {split!r}")
    elif (path / "state.json").is_file():  # one Dataset written by save_to_disk
        if split is not None:
            log.warning("data.split=%r is ignored for %s: a saved Dataset (not a DatasetDict) "
                        "holds one split", split, path)
        yield from _table_records(_load_from_disk(path), str(path))
    else:
        files = split_files(path)
        _check_split(path, split, sorted(files))
        for file in files[split]:
            yield from _read_file(file, bad)


def _check_split(path: Path, split: str | None, splits: Sequence[str]) -> None:
    if not splits:
        raise DataError(f"{path} is a folder but neither a datasets save_to_disk folder nor one of split "
                        f"files ({', '.join(f'train{s}' for s in SUFFIXES)}, or train-00000-of-00001.parquet "
                        "shards, also under data/); point the path at a data file")
    if split is None:
        raise DataError(f"{path} holds the splits {list(splits)}; choose one with data.split, "
                        f"e.g. data.split={splits[0]}")
    if split not in splits:
        raise DataError(f"{path} has no split {split!r}; its splits are {list(splits)}: set data.split "
                        "to one of them")


def split_files(path: Path) -> dict[str, list[Path]]:
    """Split name -> its files, in a folder laid out like the hub's: ``train.jsonl`` or
    ``train-00000-of-00002.parquet`` (the split is the name before the first ``-``),
    in the folder or its ``data/``."""
    out: dict[str, list[Path]] = {}
    for folder in (path, path / "data"):
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix.lower() in SUFFIXES:
                out.setdefault(file.name.split(".")[0].split("-")[0], []).append(file)
    return out


# -- datasets (imported only here: it is slow to import) -------------------------------------------

def _load_from_disk(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: cannot read this save_to_disk folder ({err}); write it again with "
                        "Dataset.save_to_disk or DatasetDict.save_to_disk") from None


def _load_parquet(files: list[Path]):
    import datasets

    bars_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the console belongs to the stage's own progress
    try:
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds; all mean an unreadable file
        raise DataError(f"{', '.join(map(str, files))}: not a readable parquet file ({err})") from None
    finally:
        if bars_on:
            datasets.enable_progress_bars()


def _table_records(table, where: str) -> Iterator[Record]:
    n = 0
    for batch in table.iter(batch_size=_TABLE_BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            n += 1
            yield Record(f"{where} row {n}", dict(zip(columns, values, strict=True)))


# -- fields ---------------------------------------------------------------------------------------

def require(record: Record, keys: Sequence[str], *, fix: str) -> None:
    """Every key present and not null; else an error naming the row, the field and ``fix``."""
    for key in keys:
        if record.fields.get(key) is None:
            state = "is null" if key in record.fields else "is missing"
            has = sorted(k for k, v in record.fields.items() if v is not None)
            raise DataError(f"{record.where}: field {key!r} {state} (the row has {has}); "
                            f"needs fields {' and '.join(map(repr, keys))}: {fix}")


def text(record: Record, key: str, *, setting: str, numbers: bool = False) -> str:
    """The field as text. ``numbers``: an int or float is accepted and written with ``str``
    (answers are often numbers in parquet columns)."""
    value = record.fields[key]
    if isinstance(value, str):
        return value
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    wanted = "text or a number" if numbers else "text"
    raise DataError(f"{record.where}: field {key!r} must be {wanted}, got {_json_type(value)} {_short(value)}; "
                    f"fix the row, or set {setting} to a field that holds {wanted}")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# -- task rows ----------------------------------------------------------------------------------

def load_rows(path: Path, *, prompt_key: str = "prompt", answer_key: str = "answer",
              kind_key: str = "kind", default_kind: str = "reasoning", split: str | None = None,
              bad: BadRows | None = None) -> list[TaskRow]:
    """Rows with a prompt and a reference answer field, from any data path above.

    A row may name its prompt type in ``kind_key`` (else ``default_kind``; a null counts as
    absent, as in parquet columns that only some rows fill); rows of a kind other than
    ``reasoning`` (general prompts, scored by reward models) need no answer. With ``bad``,
    bad rows are counted there and skipped (``read_records``).
    """
    fix = "set data.prompt_key / data.answer_key to the file's field names"
    rows = []
    for rec in read_records(path, split=split, bad=bad):
        try:
            kind = default_kind if rec.fields.get(kind_key) is None else text(rec, kind_key, setting="data.kind_key")
            require(rec, (prompt_key, answer_key) if kind == "reasoning" else (prompt_key,), fix=fix)
            answer = "" if rec.fields.get(answer_key) is None else text(rec, answer_key, setting="data.answer_key",
                                                                        numbers=True)
            rows.append(TaskRow(text(rec, prompt_key, setting="data.prompt_key"), answer, kind, where=rec.where))
        except DataError as err:
            _bad(bad, str(err))
    if not rows:
        raise DataError(f"{path} holds no rows" + (f" that can be used ({bad.count} bad; the first: {bad.first[0]})"
                                                   if bad and bad.count else ""))
    return rows


def load_pairs(path: Path, *, prompt_key: str = "prompt", response_key: str = "response",
               split: str | None = None) -> list[tuple[str, str]]:
    """The (prompt, response) texts of an SFT data path, in order."""
    out = []
    for rec in read_records(path, split=split):
        require(rec, (prompt_key, response_key), fix="set data.prompt_key / data.response_key")
        out.append((text(rec, prompt_key, setting="data.prompt_key"),
                    text(rec, response_key, setting="data.response_key")))
    return out
