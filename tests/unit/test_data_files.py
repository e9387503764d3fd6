"""Data paths of every kind give the same rows, splits are chosen explicitly, and a bad
row is named by its file (or folder and split), its row and its field."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.benchmarks import load_benchmark
from tasks.data_files import DataError, TaskRow, load_pairs, load_rows, read_records, split_files
from tasks.synthetic import GeneralTask, make_dataset, write_jsonl

pytestmark = pytest.mark.unit

ROWS = [{"prompt": "What is 12+30", "answer": "42"}, {"prompt": "What is 1+2", "answer": "3"},
        {"prompt": "Tell me about 12", "answer": "12 is an even number.", "kind": "general"}]
EXPECTED = [TaskRow("What is 12+30", "42"), TaskRow("What is 1+2", "3"),
            TaskRow("Tell me about 12", "12 is an even number.", "general")]


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """load_dataset("parquet") writes an arrow cache: keep it out of the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(tmp_path / "hf-cache"))


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (a hub lookup) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the data reader tried to connect: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dataset(rows: list[dict]):
    """A Dataset of ``rows``; a field some rows lack is null in them (as in parquet)."""
    import datasets

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])


def _parquet(path: Path, rows: list[dict]) -> Path:
    _dataset(rows).to_parquet(str(path))
    return path


# -- formats ---------------------------------------------------------------------------------------

def test_every_format_gives_the_same_rows(tmp_path, no_network):
    import datasets

    json_array = tmp_path / "array.json"
    json_array.write_text(json.dumps(ROWS, indent=1))
    paths = [_jsonl(tmp_path / "x.jsonl", ROWS), _jsonl(tmp_path / "lines.json", ROWS), json_array,
             _parquet(tmp_path / "x.parquet", ROWS)]
    _dataset(ROWS).save_to_disk(str(tmp_path / "saved"))
    paths.append(tmp_path / "saved")
    for path in paths:
        assert load_rows(path) == EXPECTED, path
    datasets.DatasetDict(train=_dataset(ROWS), test=_dataset(ROWS[:1])).save_to_disk(str(tmp_path / "dict"))
    assert load_rows(tmp_path / "dict", split="train") == EXPECTED
    assert load_rows(tmp_path / "dict", split="test") == EXPECTED[:1]


def test_jsonl_rows_are_unchanged_and_numbered_by_line(tmp_path):
    """The synthetic task files read exactly as written (same rows, same order)."""
    paths = make_dataset("addition", tmp_path)
    rows = load_rows(paths["train"])
    assert len(rows) > 100
    assert [(r.prompt, r.answer) for r in rows] == [(d["prompt"], d["answer"]) for d in
                                                    map(json.loads, paths["train"].read_text().splitlines())]
    p = tmp_path / "blank.jsonl"
    p.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert [(r.where, r.fields) for r in read_records(p)] == [(f"{p}:1", {"a": 1}), (f"{p}:4", {"a": 2})]


def test_jsonl_reading_does_not_import_datasets(tmp_path):
    """Stage start stays fast for the demo's JSONL: `datasets` is imported for parquet and
    save_to_disk folders only."""
    path = _jsonl(tmp_path / "x.jsonl", ROWS)
    code = ("import sys; from tasks.data_files import load_rows; "
            f"load_rows({str(path)!r}); print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_parquet_numbers_and_nulls(tmp_path):
    """A numeric answer column is read as text; a null ``kind`` (a column only some rows
    fill) is the default kind, and a general row's null answer is empty."""
    rows = [{"prompt": "What is 1+2", "answer": 3, "kind": None},
            {"prompt": "Tell me about 12", "answer": None, "kind": "general"}]
    assert load_rows(_parquet(tmp_path / "n.parquet", rows)) == [TaskRow("What is 1+2", "3"),
                                                                  TaskRow("Tell me about 12", "", "general")]


def test_sft_pairs_and_benchmarks_read_every_format(tmp_path):
    pairs = [{"prompt": "What is 1+2", "response": " 3"}, {"prompt": "What is 2+2", "response": " 4"}]
    expected = [("What is 1+2", " 3"), ("What is 2+2", " 4")]
    assert load_pairs(_jsonl(tmp_path / "sft.jsonl", pairs)) == expected
    assert load_pairs(_parquet(tmp_path / "sft.parquet", pairs)) == expected
    bench = [{"problem": "1+1?", "answer": 2, "level": 1}, {"problem": "2+2?", "answer": 4, "level": 2}]
    loaded = load_benchmark(_parquet(tmp_path / "math.parquet", bench), limit=5)
    assert loaded.format == "math500" and [r.reference for r in loaded.rows] == ["2", "4"]
    assert loaded.name == "math"


# -- splits ------------------------------------------------------------------------------------------

def test_dataset_dict_needs_a_split(tmp_path):
    import datasets

    datasets.DatasetDict(train=_dataset(ROWS), test=_dataset(ROWS)).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds the splits \['train', 'test'\]; choose one with data.split, "
                                        r"e.g. data.split=train"):
        load_rows(tmp_path / "dd")
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are \['train', 'test'\]"):
        load_rows(tmp_path / "dd", split="validation")


def test_a_folder_of_split_files(tmp_path):
    folder = tmp_path / "gsm"
    (folder / "data").mkdir(parents=True)
    _parquet(folder / "data" / "train-00000-of-00002.parquet", ROWS[:1])
    _parquet(folder / "data" / "train-00001-of-00002.parquet", ROWS[1:])
    _jsonl(folder / "test.jsonl", ROWS[:2])
    (folder / "README.md").write_text("not data")
    assert sorted(split_files(folder)) == ["test", "train"]
    assert load_rows(folder, split="train") == EXPECTED  # shards in order
    assert load_rows(folder, split="test") == EXPECTED[:2]
    with pytest.raises(DataError, match=r"holds the splits \['test', 'train'\]; choose one with data.split"):
        load_rows(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="neither a datasets save_to_disk folder nor one of split files"):
        load_rows(empty)


def test_a_split_on_a_single_file_is_ignored_with_a_warning(tmp_path, caplog):
    path = _jsonl(tmp_path / "x.jsonl", ROWS)
    with caplog.at_level("WARNING"):
        assert load_rows(path, split="train") == EXPECTED
    assert "data.split='train' is ignored" in caplog.text and "x.jsonl" in caplog.text


def test_unknown_suffix_and_missing_path(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"x.csv: cannot read .csv; data files are .jsonl, .json, .parquet"):
        load_rows(csv)
    with pytest.raises(DataError, match="data path .*nope.jsonl does not exist"):
        load_rows(tmp_path / "nope.jsonl")


# -- bad rows -------------------------------------------------------------------------------------------

def test_a_row_that_is_not_an_object(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [ROWS[0], ["What is 1+2", "3"]])
    with pytest.raises(DataError, match=r"x.jsonl:2: a row must be a JSON object of fields, got a array "
                                        r"\['What is 1\+2', '3'\]; write one object a row"):
        load_rows(path)
    array = tmp_path / "a.json"
    array.write_text(json.dumps([ROWS[0], "What is 1+2"]))
    with pytest.raises(DataError, match=r"a.json row 2: a row must be a JSON object"):
        load_rows(array)


def test_a_missing_field(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [ROWS[0], {"question": "What is 1+2", "answer": "3"}])
    with pytest.raises(DataError, match=r"x.jsonl:2: field 'prompt' is missing \(the row has \['answer', "
                                        r"'question'\]\); needs fields 'prompt' and 'answer': set data.prompt_key"):
        load_rows(path)
    with pytest.raises(DataError, match=r"x.jsonl:1: field 'question' is missing"):
        load_rows(path, prompt_key="question")
    pq = _parquet(tmp_path / "x.parquet", [ROWS[0], {"prompt": "What is 1+2", "answer": None}])
    with pytest.raises(DataError, match=r"x.parquet row 2: field 'answer' is null .*set data.prompt_key / "
                                        r"data.answer_key"):
        load_rows(pq)


def test_a_wrong_type(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [ROWS[0], {"prompt": ["What is", "1+2"], "answer": "3"}])
    with pytest.raises(DataError, match=r"x.jsonl:2: field 'prompt' must be text, got array \['What is', "
                                        r"'1\+2'\]; fix the row, or set data.prompt_key"):
        load_rows(path)
    path = _jsonl(tmp_path / "y.jsonl", [{"prompt": "What is 1+2", "answer": {"value": 3}}])
    with pytest.raises(DataError, match=r"y.jsonl:1: field 'answer' must be text or a number, got object"):
        load_rows(path)
    pairs = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": 3}])
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'response' must be text, got number 3; fix the row, "
                                        r"or set data.response_key"):
        load_pairs(pairs)


def test_a_non_utf8_byte_is_named_by_line_and_column(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n' * 3 + b'{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:4: not UTF-8 text \(byte 0xe9 at column 16\); "
                                        r"re-save the file as UTF-8"):
        load_rows(path)


def test_bad_rows_in_a_saved_dataset_name_folder_split_and_row(tmp_path):
    import datasets

    rows = [{"prompt": "What is 1+2", "answer": "3"}, {"prompt": None, "answer": "4"}]
    datasets.DatasetDict(train=_dataset(rows)).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd split 'train' row 2: field 'prompt' is null"):
        load_rows(tmp_path / "dd", split="train")
    _dataset([{"prompt": 7, "answer": "7"}]).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match=r"one row 1: field 'prompt' must be text, got number 7"):
        load_rows(tmp_path / "one")


def test_bad_benchmark_rows_are_named(tmp_path):
    path = _jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "answer": "1"}, ["q", "1"]])
    with pytest.raises(DataError, match=r"b.jsonl:2: a row must be a JSON object"):
        load_benchmark(path)
    path = _jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "test_list": "assert f() == 1"}])
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'test_list' must be a list of strings"):
        load_benchmark(path)


def test_general_rows_need_no_answer_in_any_format(tmp_path):
    rows = GeneralTask().rows("train", test_share=0.2, seed=0)[:3]
    write_jsonl(rows, tmp_path / "g.jsonl")
    assert load_rows(tmp_path / "g.jsonl") == rows
    bare = [{"prompt": r.prompt, "kind": "general"} for r in rows]
    assert [r.answer for r in load_rows(_parquet(tmp_path / "g.parquet", bare))] == ["", "", ""]
