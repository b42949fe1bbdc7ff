"""Data sources: JSONL, JSON, CSV/TSV, Parquet and rows in memory; ids from columns or row numbers; errors
that name the file, the line or row, and the field."""

from __future__ import annotations

import json

import pytest

from llmeraser.chat import Message
from llmeraser.data import Example, examples_from_rows, read_examples, row_id
from llmeraser.errors import InputError
from llmeraser.models import build_byte_tokenizer
from llmeraser.sources import data_format
from llmeraser.validate import check_examples_fit, line_of_id, row_of_id

ROWS = [{"id": "a", "prompt": "P1", "response": "R1"}, {"id": "b", "prompt": "P2", "response": "R2"}]
EXPECTED = [Example("a", "P1", "R1"), Example("b", "P2", "R2")]


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --- formats -------------------------------------------------------------------------------------------


def test_format_follows_the_extension():
    assert [data_format(p) for p in ("a.jsonl", "a.JSON", "a.csv", "a.tsv", "a.parquet", "a.txt", "a")] == [
        "jsonl", "json", "csv", "tsv", "parquet", "jsonl", "jsonl"]


def test_json_list_and_object_with_rows(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "obj.json").write_text(json.dumps({"data": ROWS, "version": 2}), encoding="utf-8")
    assert read_examples(tmp_path / "list.json") == EXPECTED
    assert read_examples(tmp_path / "obj.json") == EXPECTED


def test_unknown_extension_is_read_as_jsonl(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    assert read_examples(path) == EXPECTED


def test_csv_with_header_quoted_newlines_and_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfid,prompt,response\r\na,P1,R1\r\n\r\nb,\"two\nlines, quoted\",\" Yes\"\r\n7,P3,R3\r\n")
    assert read_examples(path) == [Example("a", "P1", "R1"), Example("b", "two\nlines, quoted", " Yes"),
                                   Example("7", "P3", "R3")]
    assert line_of_id(path, "7") == 6  # the quoted newline makes row b span lines 4-5


def test_tsv_and_alpaca_columns(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("example_id\tinstruction\tinput\toutput\nx\tDo it\twith this\tdone\ny\tJust do it\t\tok\n",
                    encoding="utf-8")
    assert read_examples(path) == [Example("x", "Do it\n\nwith this", "done"), Example("y", "Just do it", "ok")]


CHAT = [{"id": "c1", "messages": [{"role": "system", "content": "Be brief, \"exact\""},
                                  {"role": "user", "content": "Hi,\nthere"}, {"role": "assistant", "content": "Yo"}]},
        {"id": "c2", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]


def write_csv(path, rows, columns):
    import csv

    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


def test_csv_messages_column_holds_the_conversation_as_json(tmp_path):
    """A conversation in CSV: the ``messages`` (or ``conversations``) column holds its JSON list of messages;
    read as the same rows in JSONL are (same examples, same hash)."""
    from llmeraser.hashing import dataset_hash

    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT), encoding="utf-8")
    expected = read_examples(tmp_path / "chat.jsonl")
    from_csv = read_examples(write_csv(tmp_path / "chat.csv", CHAT, ["id", "messages", "conversations"]))
    assert from_csv == expected and dataset_hash(from_csv) == dataset_hash(expected)
    assert from_csv[0].messages[1] == Message("user", "Hi,\nthere")
    # a Parquet string column of the same JSON reads the same
    as_strings = [{"id": r["id"], "messages": json.dumps(r.get("messages") or r["conversations"])} for r in CHAT]
    assert read_examples(write_parquet(tmp_path / "chat.parquet", as_strings)) == expected


@pytest.mark.parametrize(
    "cell, message",
    [
        ('[{"role": "user", "content": "Hi"}', ":3: field 'messages' is not valid JSON (Expecting ',' delimiter"),
        ("not json", ":3: field 'messages' is not valid JSON (Expecting value, character 0)"),
        ('{"role": "user"}', ":3: field 'messages' must be a list of messages, got dict"),
        ('[{"role": "user", "content": "Hi"}, {"role": "assistant"}]', ":3: field 'messages' message 1: missing 'content'"),
    ],
)
def test_bad_csv_messages_cell_names_file_line_and_field(tmp_path, cell, message):
    rows = [{"id": "a", "messages": CHAT[0]["messages"]}, {"id": "b", "messages": cell}]
    path = write_csv(tmp_path / "d.csv", rows, ["id", "messages"])
    with pytest.raises(InputError) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}{message}"), str(info.value)


def test_parquet_prompt_response_and_messages(tmp_path):
    assert read_examples(write_parquet(tmp_path / "d.parquet", ROWS)) == EXPECTED
    chat = [{"uid": "c1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    (example,) = read_examples(write_parquet(tmp_path / "chat.parquet", chat))
    assert example.id == "c1" and example.messages == (Message("user", "Hi"), Message("assistant", "Yo"))


def test_rows_in_memory_and_a_datasets_dataset(tmp_path):
    assert examples_from_rows(ROWS) == EXPECTED
    assert examples_from_rows(iter(ROWS), source="gen") == EXPECTED  # any iterable of mappings
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([{"prompt": "P1", "completion": "C1"}, {"prompt": "P2", "completion": "C2"}])
    examples = examples_from_rows(dataset, source="hub:toy")
    assert examples == [Example("row-0", "P1", "C1"), Example("row-1", "P2", "C2")]
    assert examples.ids_from_row_numbers and examples.source == "hub:toy"


# --- ids -----------------------------------------------------------------------------------------------


def test_ids_from_row_numbers_when_no_id_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"P{i}", "response": "R"}) for i in range(3)) + "\n\n",
                    encoding="utf-8")
    examples = read_examples(path)
    assert [e.id for e in examples] == ["row-0", "row-1", "row-2"] == [row_id(i) for i in range(3)]
    assert examples.ids_from_row_numbers
    assert not read_examples(write_parquet(tmp_path / "d.parquet", ROWS)).ids_from_row_numbers
    assert line_of_id(path, "row-2") == 3 and row_of_id(path, "row-1") == 1
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,response\nP0,R\nP1,R\n", encoding="utf-8")
    assert [e.id for e in read_examples(csv_path)] == ["row-0", "row-1"]


def test_an_id_after_rows_without_ids_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "P", "response": "R"}) + "\n" + json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"d\.jsonl:2: field 'id' given, but the first row has no id field"):
        read_examples(path)


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ("id,prompt,response\na,P,R\nb,P,R,extra\n", ":3: expected 3 fields (as the header: id, prompt, response), got 4"),
        ("id,prompt,response\na,P,R\nb,P\n", ":3: expected 3 fields"),
        ("id,prompt\na,P\n", ":1: missing column 'response' (or 'completion'); the columns are: id, prompt"),
        ("id,text\na,P\n", ":1: missing column 'prompt'"),
        ("id,prompt,response\na,P,R\nb,,R\n", ":3: field 'prompt' is empty"),
        ("id,prompt,response\na,P,R\na,P2,R2\n", ":3: duplicate id 'a' (first seen on line 2)"),
        ("id,prompt,id\na,P,R\n", ":1: column 'id' appears twice in the header"),
        ("id,prompt,response\n", ": no examples in file"),
    ],
)
def test_bad_csv_names_file_line_and_field(tmp_path, body, message):
    path = tmp_path / "d.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}{message}"), str(info.value)


def test_csv_undecodable_bytes_name_the_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"id,prompt,response\na,caf\xe9,R\n")
    with pytest.raises(InputError, match=r"d\.csv:\d+: not valid UTF-8"):
        read_examples(path)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"id": "a", "prompt": "P"}], ": missing column 'response' (or 'completion'); the columns are: id, prompt"),
        ([{"id": "a", "prompt": "P", "response": "R"}, {"id": "b", "prompt": None, "response": "R"}],
         ": row 1: field 'prompt' must be a string, got NoneType"),
        ([{"id": "a", "prompt": 1, "response": "R"}], ": row 0: field 'prompt' must be a string, got int"),
        ([{"id": "a", "prompt": "P", "response": "R"}, {"id": "a", "prompt": "Q", "response": "S"}],
         ": row 1: duplicate id 'a' (first seen on row 0)"),
    ],
)
def test_bad_parquet_names_file_row_and_field(tmp_path, rows, message):
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(InputError) as info:
        read_examples(path)
    assert str(info.value) == f"{path}{message}"


def test_not_parquet_and_bad_json_are_errors_naming_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_text("not parquet", encoding="utf-8")
    with pytest.raises(InputError, match=r"d\.parquet: cannot read as Parquet"):
        read_examples(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text('[{"id": "a", "prompt": "P", "response": "R"},\n 3]', encoding="utf-8")
    with pytest.raises(InputError, match=r"d\.json: row 1: expected a JSON object, got int"):
        read_examples(tmp_path / "d.json")
    (tmp_path / "e.json").write_text('[{"id": "a",\n "prompt": }]', encoding="utf-8")
    with pytest.raises(InputError, match=r"e\.json:2: malformed JSON"):
        read_examples(tmp_path / "e.json")
    (tmp_path / "f.json").write_text('{"train": []}', encoding="utf-8")
    with pytest.raises(InputError, match=r"f\.json: expected a JSON list of rows, or an object with one list"):
        read_examples(tmp_path / "f.json")


def test_rows_in_memory_errors_name_the_source_and_row():
    with pytest.raises(InputError) as info:
        examples_from_rows([ROWS[0], {"id": "b", "prompt": "P", "response": 3}], source="mine")
    assert str(info.value) == "mine: row 1: field 'response' must be a string, got int"
    with pytest.raises(InputError, match="mine: row 0: expected a mapping"):
        examples_from_rows(["not a row"], source="mine")
    with pytest.raises(InputError, match="<rows>: no examples"):
        examples_from_rows([])


def test_fit_errors_name_the_line_or_row_of_the_example(tmp_path):
    tokenizer = build_byte_tokenizer()
    rows = [ROWS[0], {"id": "long", "prompt": "P", "response": "a response far too long for eight tokens"}]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("id,prompt,response\n" + "".join(f"{r['id']},{r['prompt']},{r['response']}\n" for r in rows),
                        encoding="utf-8")
    with pytest.raises(InputError) as info:
        check_examples_fit(tokenizer, read_examples(csv_path), 8, csv_path)
    assert str(info.value).startswith(f"{csv_path}:3: example 'long': response is")
    parquet = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(InputError) as info:
        check_examples_fit(tokenizer, read_examples(parquet), 8, parquet)
    assert str(info.value).startswith(f"{parquet}: row 1: example 'long': response is")
