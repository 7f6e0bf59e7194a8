"""Local data files as users bring them: each row named by the line an editor shows, text read in
data.encoding, and a file that is not what its name says refused in one line naming the file and the place."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from trainable.records import DataError, read_records

ROWS = [{"instruction": f"Say {word}.", "output": word} for word in ("café", "naïve", "façade")]


def lines_of(rows: list[tuple[str, dict]], path: Path) -> list[int]:
    assert all(where.startswith(f"{path}:") for where, _ in rows)
    return [int(where.rsplit(":", 1)[1]) for where, _ in rows]


def test_a_csv_row_is_named_by_its_line_counting_the_header(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    # Line 1 the header, line 2 a row, lines 3-4 one row whose quoted field holds a line break, line 5 blank.
    path.write_text('instruction,output\nSay a.,a\n"Say\nb.",b\n\nSay c.,c\n')
    rows = read_records(path)
    assert lines_of(rows, path) == [2, 3, 6]
    assert [row for _, row in rows] == [
        {"instruction": "Say a.", "output": "a"},
        {"instruction": "Say\nb.", "output": "b"},
        {"instruction": "Say c.", "output": "c"},
    ]


def test_a_json_list_names_each_record_by_the_line_it_starts_on(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2))  # each record is 4 lines: {, two keys, }
    assert lines_of(read_records(path), path) == [2, 6, 10]
    path.write_text('[{"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n "output": "d"}]')
    assert lines_of(read_records(path), path) == [1, 3]
    path.write_text(json.dumps([ROWS[0], 7], indent=2))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}:6: expected a JSON object, got int"


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".txt"])
def test_data_encoding_is_honoured_for_every_text_format(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(ROWS)
    text = {
        ".csv": frame.to_csv(index=False),
        ".json": json.dumps(ROWS, ensure_ascii=False),
        ".jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS),
        ".txt": "\n\n".join(r["output"] for r in ROWS),
    }[suffix]
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(DataError, match="not utf-8 text: byte 0xe9"):
        read_records(path)
    rows = [row for _, row in read_records(path, encoding="cp1252")]
    column = "text" if suffix == ".txt" else "output"
    assert [row[column] for row in rows] == ["café", "naïve", "façade"]


def test_utf8_skips_the_byte_order_mark_of_excels_csv_utf8(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(pd.DataFrame(ROWS).to_csv(index=False).encode("utf-8-sig"))
    assert list(read_records(path)[0][1]) == ["instruction", "output"]  # not "\ufeffinstruction"


def test_utf16_text_is_named_and_read_when_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "unicode.csv"
    path.write_bytes(pd.DataFrame(ROWS).to_csv(index=False).encode("utf-16"))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}: UTF-16 text (the file starts with UTF-16's byte-order mark), not utf-8; set "
        "data.encoding=utf-16, or save the file as UTF-8"
    )
    assert read_records(path, encoding="utf-16")[2][1]["output"] == "façade"


def test_a_latin1_csv_is_named_by_line_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(b"instruction,output\nSay hi.,hi\nOrder a caf\xe9.,ok\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}:3: not utf-8 text: byte 0xe9 at byte offset 41 (after 'Order a caf') cannot be decoded; set "
        "data.encoding to the file's encoding (a spreadsheet's CSV export is often cp1252, Windows' Western "
        "encoding: data.encoding=cp1252), or save the file as UTF-8"
    )
    assert path.read_bytes()[41] == 0xE9  # the offset is the byte's own


def test_compressed_and_binary_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n'))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}: gzip-compressed data, not text; decompress it (gunzip) and point data.source at the file inside"
    )
    path.write_bytes(b'{"text": "a"}\n{"text": "\x00\x01\x02"}\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}:2: binary data, not text: a NUL byte at byte offset 24; a .jsonl file must be text (is it "
        "another format renamed, or compressed?)"
    )


def test_a_csv_row_that_does_not_match_its_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\nSay a.,a\nSay b, please.,b\n")  # an unquoted comma: 3 fields
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}:3: 3 fields where the header has 2 (instruction, output); a field holding a comma, a quote "
        'or a line break must be quoted ("...", with "" for a quote)'
    )
    path.write_text('instruction,output\nSay "a".,a\n"Say "b".",b\n')  # a quote inside a quoted field
    with pytest.raises(DataError, match=r"data\.csv:3: not valid CSV \(',' expected after '\"'\)"):
        read_records(path)
    path.write_text("instruction;output\nSay a.;a\n")  # a spreadsheet's export where ; separates
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}:1: the header is one column, 'instruction;output': the file is separated by semicolons, "
        "not commas; save it as comma-separated CSV"
    )
    path.write_text("instruction,output,,\nSay a.,a,,\n")  # empty trailing columns, as spreadsheets add
    assert read_records(path)[0][1] == {"instruction": "Say a.", "output": "a", "": ""}


def test_broken_json_is_named_by_line_with_the_likely_cause(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    whole = json.dumps(ROWS, indent=2)  # the third record on lines 10-13, its "output" on line 12
    path.write_text(whole[: whole.rindex('"output"') + 5])  # a copy cut short inside that key
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}:12: not valid JSON (Unterminated string, column 5); the file ends before the JSON does "
        "(cut short?)"
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # JSON Lines named .json
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}:2: not valid JSON (Extra data, column 1); the file holds more than one JSON value: JSON Lines "
        "(an object per line) go in a .jsonl file"
    )
    path.write_text(json.dumps({"train": ROWS}))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert (
        str(err.value)
        == f"{path}: expected a JSON list of records ([{{...}}, {{...}}]), got an object with keys train"
    )
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(ROWS, indent=2))  # a JSON list named .jsonl
    with pytest.raises(DataError) as err:
        read_records(lines)
    assert str(err.value) == (
        f"{lines}:1: not valid JSON (Expecting value); this looks like a JSON list: name the file .json"
    )


def test_broken_parquet_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    buffer = io.BytesIO()
    pd.DataFrame(ROWS).to_parquet(buffer)
    whole = buffer.getvalue()
    path.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}: a Parquet file cut short ({len(whole) // 2} bytes): it does not end with Parquet's 'PAR1' "
        "marker, so its schema is lost; copy or export it again"
    )
    path.write_text(pd.DataFrame(ROWS).to_csv(index=False))  # a CSV renamed
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}: not a Parquet file: it does not start with Parquet's 'PAR1' marker (another format renamed "
        ".parquet?)"
    )
    footer = len(whole) - 8 - int.from_bytes(whole[-8:-4], "little")  # where the schema (the footer) starts
    path.write_bytes(whole[:footer] + b"\xff" * (len(whole) - 8 - footer) + whole[-8:])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}: a corrupt Parquet file (")
    assert str(err.value).endswith("); copy or export it again")


def test_plain_text_is_a_document_per_blank_line_separated_block(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("First document,\nits second line.\n\n\nSecond document.\r\n\r\nThird\n")
    rows = read_records(path)
    assert [row for _, row in rows] == [
        {"text": "First document,\nits second line."},
        {"text": "Second document."},
        {"text": "Third"},
    ]
    assert lines_of(rows, path) == [1, 5, 7]
    # Without any blank line: a document per line, as `datasets`' text loader and wiki-style dumps have it.
    path.write_text("Anarchism is a political philosophy.\nAutism is a condition.\nAlbedo is reflectance.\n")
    rows = read_records(path)
    assert [row["text"] for _, row in rows] == [
        "Anarchism is a political philosophy.",
        "Autism is a condition.",
        "Albedo is reflectance.",
    ]
    assert lines_of(rows, path) == [1, 2, 3]


def test_an_unknown_suffix_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text("instruction\toutput\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"data.source: {path} has suffix '.tsv'; expected one of .jsonl, .json, .parquet, .csv, .txt (or a "
        "folder in the hub's layout, or a hub dataset id)"
    )
