"""Rows of a local data file, each named by where it is, for error messages: `file:line`, the line an editor
shows. A CSV's header is line 1 and a record spanning lines is named by its first; a record of a JSON list
by the line it starts on; a plain-text document by its first line; a Parquet row by its number.

    rows = read_records(Path("export.csv"), encoding="cp1252")   # [("/abs/export.csv:2", {...}), ...]

Text files (.jsonl, .json, .csv, .txt) are decoded with `data.encoding`. A file that is not what its name
says (another encoding, binary or compressed data, a Parquet file cut short, JSON Lines named .json) is
one DataError naming the file, the place and the fix, not a traceback.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
_PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with it; the schema sits just before the end


class DataError(ValueError):
    """Bad data, named by file and line (or row) where there is one."""


Numbered = list[tuple[str, dict[str, Any]]]  # rows with where they came from ("file:line"), for errors


def read_records(path: Path, *, encoding: str = "utf-8") -> Numbered:
    """Rows of a local .jsonl/.json/.parquet/.csv/.txt file with their `file:line`; a file or row that cannot
    be read is a DataError naming the file and the line (or byte offset)."""
    if not path.exists():
        raise DataError(f"data.source: file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"data.source: {path} has suffix {suffix!r}; expected one of {', '.join(SUFFIXES)} (or a folder "
            "in the hub's layout, or a hub dataset id)"
        )
    if suffix == ".parquet":
        return _parquet_rows(path)
    text = read_text(path, encoding=encoding)
    read = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".txt": _txt_rows}[suffix]
    return [(f"{path}:{line}", row) for line, row in read(text, path)]


def read_text(path: Path, *, encoding: str) -> str:
    """The file's text in `encoding`; utf-8 skips a leading byte-order mark (Excel's "CSV UTF-8" writes one,
    and it would otherwise stick to the first column's name)."""
    raw = path.read_bytes()
    codec = codecs.lookup(encoding).name
    wide = codec.startswith(("utf-16", "utf-32"))  # their text holds NUL bytes
    for magic, kind, fix in (
        (b"\x1f\x8b", "gzip-compressed", "decompress it (gunzip)"),
        (b"PK\x03\x04", "a zip archive", "unpack it"),
    ):
        if raw.startswith(magic):
            raise DataError(f"{path}: {kind} data, not text; {fix} and point data.source at the file inside")
    if not wide and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            f"{path}: UTF-16 text (the file starts with UTF-16's byte-order mark), not {encoding}; set "
            "data.encoding=utf-16, or save the file as UTF-8"
        )
    nul = -1 if wide else raw.find(b"\x00")
    if nul >= 0:  # no text in an 8-bit encoding holds a NUL byte: this is some other file renamed
        raise DataError(
            f"{path}:{_line_at(raw, nul)}: binary data, not text: a NUL byte at byte offset {nul}; a "
            f"{path.suffix.lower()} file must be text (is it another format renamed, or compressed?)"
        )
    start = len(codecs.BOM_UTF8) if codec == "utf-8" and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode(codec)
    except UnicodeDecodeError as err:
        offset = start + err.start
        line_start = raw.rfind(b"\n", 0, offset) + 1
        before = raw[line_start:offset].decode(codec, errors="replace")[-30:]
        guess = (
            " (a spreadsheet's CSV export is often cp1252, Windows' Western encoding: data.encoding=cp1252)"
            if codec == "utf-8"
            else ""
        )
        raise DataError(
            f"{path}:{_line_at(raw, offset)}: not {encoding} text: byte 0x{raw[offset]:02x} at byte offset "
            f"{offset} (after {before!r}) cannot be decoded; set data.encoding to the file's "
            f"encoding{guess}, or save the file as UTF-8"
        ) from None


def _line_at(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _jsonl_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        # A pretty-printed JSON list opens with "[" alone on its first line.
        listed = "; this looks like a JSON list: name the file .json" if line.lstrip().startswith("[") else ""
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}){listed}") from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{number}: expected a JSON object (one per line), got {type(row).__name__}{listed}"
            )
        rows.append((number, row))
    return rows


def _json_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The records of a JSON list, each with the line its `{` is on."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data":
            hint = "; the file holds more than one JSON value: JSON Lines (an object per line) go in a .jsonl file"
        elif err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string"):  # ran out of text
            hint = "; the file ends before the JSON does (cut short?)"
        reason = err.msg.removesuffix(" starting at")  # json's own wording expects a place after it
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({reason}, column {err.colno}){hint}") from None
    if not isinstance(data, list):
        got = (
            f"an object with keys {', '.join(list(data)[:5])}"
            if isinstance(data, dict)
            else type(data).__name__
        )
        raise DataError(f"{path}: expected a JSON list of records ([{{...}}, {{...}}]), got {got}")
    # The text is valid JSON: walk the list once more, only to find where each record starts.
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0
    rows = []
    for record in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        rows.append((line, record))
        pos = decoder.raw_decode(text, pos)[1]
    return rows


def _csv_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows under the header line, each with the line it starts on. A row whose fields do not match the
    header is refused: it was cut short or split at an unquoted comma, and would be read into wrong
    columns."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # strict: a stray quote is an error
    header: list[str] | None = None
    rows = []
    end = 0
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:  # a blank line
                continue
            if header is None:
                header = record
                for separator, name in ((";", "semicolons"), ("\t", "tabs")):
                    if len(header) == 1 and separator in header[0]:
                        raise DataError(
                            f"{path}:{start}: the header is one column, {header[0]!r}: the file is separated "
                            f"by {name}, not commas; save it as comma-separated CSV"
                        )
                continue
            extra = record[len(header) :]
            if len(record) < len(header) or any(field.strip() for field in extra):
                raise DataError(
                    f"{path}:{start}: {len(record)} fields where the header has {len(header)} "
                    f"({', '.join(header)}); a field holding a comma, a quote or a line break must be quoted "
                    '("...", with "" for a quote)'
                )
            rows.append((start, dict(zip(header, record, strict=False))))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    return rows


def _txt_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Plain text as {"text": document} rows: documents are separated by blank lines, as paragraphs and
    articles in a text corpus are. A file without any blank line holds one document per line, the layout of
    `datasets`' text loader (and of corpora such as LLaMA-Factory's wiki_demo.txt)."""
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] | None = None
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            current = None
        elif current is None:
            current = [line]
            blocks.append((number, current))
        else:
            current.append(line)
    if len(blocks) == 1:
        first, lines = blocks[0]
        blocks = [(first + i, [line]) for i, line in enumerate(lines)]
    return [(first, {"text": "\n".join(lines)}) for first, lines in blocks]


def _parquet_rows(path: Path) -> Numbered:
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(len(_PARQUET_MAGIC))
        f.seek(max(0, size - len(_PARQUET_MAGIC)))
        tail = f.read()
    if head != _PARQUET_MAGIC:
        raise DataError(
            f"{path}: not a Parquet file: it does not start with Parquet's {_PARQUET_MAGIC.decode()!r} "
            "marker (another format renamed .parquet?)"
        )
    if tail != _PARQUET_MAGIC or size < 2 * len(_PARQUET_MAGIC):
        raise DataError(
            f"{path}: a Parquet file cut short ({size} bytes): it does not end with Parquet's "
            f"{_PARQUET_MAGIC.decode()!r} marker, so its schema is lost; copy or export it again"
        )
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: a corrupt Parquet file ({reason}); copy or export it again") from None
    return [(f"{path}:{number}", row) for number, row in enumerate(rows, start=1)]
