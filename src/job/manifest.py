"""Reading a job's manifest: JSONL, a JSON list of rows, CSV or a folder of images, into items.

A row names its image(s) and, for edits, its source image(s) and instruction:

    {"id": "0001", "image": "edited/0001.png", "source_image": "src/0001.png",
     "instruction": "make the sky pink", "category": "color"}

Accepted names: `image`/`images`/`edited_image`/`edited_images`; `source_image`/`source_images`/
`original_image`/`original_images`; `instruction`/`prompt`; `id`; `category`. Other fields are
kept as metadata (a `notes` field too: the judge's notes for that row then go under
`judge_notes`, a name a row may not use). Relative paths are relative to the manifest's folder. In
CSV, several images in one cell are separated by `|`, and a whole number in `max_new_tokens` is
read as that number. A .json (or .jsonl) file holds one row per line, or one JSON list of rows
(`json.dump(rows, f, indent=2)`), each then named by the line it starts on.

A bad row does not stop the job: it becomes a `ManifestRow` with an `error`, and the job records
a failed result for it naming the line and the cause.
"""
from __future__ import annotations

import csv
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.models.reward.errors import JudgeInputError
from src.models.reward.types import JUDGE_NOTES, ScoreItem

IMAGE_KEYS = ("image", "images", "edited_image", "edited_images")
SOURCE_KEYS = ("source_image", "source_images", "original_image", "original_images")
TEXT_KEYS = ("instruction", "prompt")
_SPACE = re.compile(r"[ \t\r\n]*")  # JSON's whitespace
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# The one free field the judge reads as a number: an item's own answer budget (README). A CSV cell is
# text, so a whole number there ("64") is read as that number; anything else ("1.5", "abc") stays
# text, and the judge's own error names it.
_BUDGET_KEY = "max_new_tokens"
_WHOLE = re.compile(r"[0-9]+")


class ManifestError(JudgeInputError):
    """The manifest as a whole cannot be read (missing, empty, wrong format)."""


@dataclass
class ManifestRow:
    id: str
    line: int                      # 1-based line (JSONL/CSV) or position (folder)
    item: ScoreItem | None = None
    error: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # what the row said, for the results file


def read_manifest(path: str | Path) -> list[ManifestRow]:
    p = Path(path)
    if not p.exists():
        raise ManifestError(f"manifest not found: {p}")
    if p.is_dir():
        rows = _read_folder(p)
    elif (wide := _utf16_or_32(p)) is not None:
        raise ManifestError(f"manifest {p} is {wide} text; save it as UTF-8")
    elif p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = _read_jsonl(p)
    elif p.suffix.lower() in (".csv", ".tsv"):
        rows = _read_csv(p)
    else:
        raise ManifestError(f"manifest {p}: unknown format {p.suffix!r}; use .jsonl, .csv or a folder of images")
    if not rows:
        raise ManifestError(f"manifest {p} has no rows")
    if not p.is_dir():
        _check_base(rows, p)
    _mark_duplicates(rows)
    return rows


def _check_base(rows: list[ManifestRow], p: Path, first: int = 20) -> None:
    """Refuse, before any judge loads, a manifest whose relative image paths were written from the
    current folder instead of the manifest's: none of the first rows' images is beside the
    manifest, and every one of them is under the current folder. Each item would otherwise fail
    late, one 'image not found' at a time."""
    import os

    base = p.parent
    paths = [img for r in rows[:first] if r.item is not None
             for img in (*r.item.images, *r.item.source_images)]
    relative = [os.path.relpath(img, base) for img in paths]
    if not paths or any(rel.startswith("..") or os.path.isabs(rel) for rel in relative):
        return  # absolute paths, or paths that leave the manifest's folder: meant as written
    if any(os.path.exists(img) for img in paths) or not all(os.path.isfile(rel) for rel in relative):
        return
    raise ManifestError(
        f"manifest {p}: relative image paths are read from the manifest's folder ({base}), where none of the "
        f"first {len(paths)} image(s) is, e.g. {paths[0]}; they are all under the current folder "
        f"({os.getcwd()}), e.g. {relative[0]}. Write them relative to the manifest's folder, or as absolute paths")


def _utf16_or_32(p: Path) -> str | None:
    """'UTF-16' or 'UTF-32' for a file that starts with their byte-order mark (Windows PowerShell's
    `>`, Excel's 'Unicode text'): read as UTF-8 it would be rows of garbage, each failing alone."""
    with p.open("rb") as fh:
        head = fh.read(4)
    if head in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "UTF-32"
    return "UTF-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else None


def _read_folder(folder: Path) -> list[ManifestRow]:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    rows = []
    for n, f in enumerate(files, 1):
        rid = f.relative_to(folder).as_posix()
        rows.append(ManifestRow(id=rid, line=n, item=ScoreItem(images=[str(f)], id=rid), fields={"images": [str(f)]}))
    return rows


def _read_jsonl(p: Path) -> list[ManifestRow]:
    rows = []
    # utf-8-sig: a byte-order mark (Excel, PowerShell write one) is not part of the first row.
    with p.open(encoding="utf-8-sig", errors="replace") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):  # one JSON list of rows (or JSONL whose first row is, wrongly, a list)
        listed = _read_json_list(text, p)
        if listed is not None:
            return listed
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line.rstrip("\r\n"))  # without the line's end, the column is the line's own
        except json.JSONDecodeError as e:
            why = f"{e.msg.removesuffix(' at')} at column {e.colno}"
            rows.append(ManifestRow(id=f"line{n}", line=n, error=f"{p.name} line {n}: not valid JSON ({why})"))
            continue
        rows.append(_row_from_mapping(data, n, p))
    return rows


def _read_json_list(text: str, p: Path) -> list[ManifestRow] | None:
    """The rows of a manifest written as one JSON list (`json.dump(rows, indent=2)`), each named by
    the line its value starts on; None when more follows the list (JSONL whose first row is a list:
    read line by line, that row fails alone). A list that is not valid JSON cannot be cut into rows:
    the manifest as a whole is refused, naming the place."""
    decoder = json.JSONDecoder()
    rows: list[ManifestRow] = []
    at, line, counted = text.index("[") + 1, 1, 0
    try:
        while True:
            at = _SPACE.match(text, at).end()
            if text.startswith("]", at) and not rows:
                break
            line, counted = line + text.count("\n", counted, at), at
            value, at = decoder.raw_decode(text, at)
            rows.append(_row_from_mapping(value, line, p))
            at = _SPACE.match(text, at).end()
            if text.startswith(",", at):
                at += 1
            elif text.startswith("]", at):
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
        if text[at + 1:].strip():
            return None
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {p}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_csv(p: Path) -> list[ManifestRow]:
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    rows = []
    with p.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh, delimiter=delim)
        header = next(reader, None)
        if not header:
            raise ManifestError(f"manifest {p}: no header row")
        end = reader.line_num
        for cells in reader:
            # A row is named by the line it starts on (a quoted cell may span lines); a row of empty
            # cells (a spreadsheet's export ends in them) is a blank line.
            n, end = end + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                rid = cells[header.index("id")].strip() if "id" in header else ""
                rows.append(ManifestRow(id=rid or f"line{n}", line=n,
                                        error=f"{p.name} line {n}: more cells than header columns"))
                continue
            clean: dict[str, Any] = {}
            for k, v in zip(header, cells):
                v = v.strip()
                if k in IMAGE_KEYS + SOURCE_KEYS and "|" in v:
                    clean[k] = [x.strip() for x in v.split("|") if x.strip()]
                elif k == _BUDGET_KEY and _WHOLE.fullmatch(v):
                    clean[k] = int(v)
                elif v != "":
                    clean[k] = v
            rows.append(_row_from_mapping(clean, n, p))
    return rows


def _row_from_mapping(data: Any, n: int, p: Path) -> ManifestRow:
    where = f"{p.name} line {n}"
    if not isinstance(data, dict):
        return ManifestRow(id=f"line{n}", line=n, error=f"{where}: expected an object, got {type(data).__name__}")
    rid = data.get("id", f"line{n}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid).strip() == "":
        return ManifestRow(id=f"line{n}", line=n, error=f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
    rid = str(rid)
    category = data.get("category")
    if isinstance(category, str) and not category.strip():
        category = None  # blank: no category, as an empty CSV cell is
    try:
        images = _images(data, IMAGE_KEYS, where, p.parent, required=True)
        sources = _images(data, SOURCE_KEYS, where, p.parent, required=False)
        text = None
        for k in TEXT_KEYS:
            if k in data and data[k] is not None:
                if not isinstance(data[k], str):
                    raise ValueError(f"{where}: '{k}' must be a string, got {type(data[k]).__name__}")
                text = data[k]
                break
        if category is not None and not isinstance(category, (str, int)):
            raise ValueError(f"{where}: 'category' must be a string, got {type(category).__name__}")
        if JUDGE_NOTES in data:  # a resumed job tells a row's own notes from the judge's by it (runner)
            raise ValueError(f"{where}: '{JUDGE_NOTES}' is where the job writes the judge's notes for a row that has "
                             "a 'notes' field of its own; give this field another name")
    except ValueError as e:
        return ManifestRow(id=rid, line=n, error=str(e), fields={k: v for k, v in data.items()
                                                                 if _jsonable(v) and (k != "category" or category is not None)})
    skip = set(IMAGE_KEYS) | set(SOURCE_KEYS) | set(TEXT_KEYS) | {"id"}
    meta = {k: v for k, v in data.items() if k not in skip and (k != "category" or category is not None)}
    if category is not None:
        meta["category"] = str(category)
    item = ScoreItem(images=images, source_images=sources, instruction=text, id=rid, metadata=meta)
    fields = {"images": images, "source_images": sources, "instruction": text}
    return ManifestRow(id=rid, line=n, item=item, fields=fields)


def _images(data: dict, keys: tuple[str, ...], where: str, base: Path, required: bool) -> list[str]:
    present = [k for k in keys if data.get(k) not in (None, "", [])]
    if len(present) > 1:
        raise ValueError(f"{where}: give only one of {', '.join(present)}")
    if not present:
        if required:
            empty = [k for k in keys if k in data]
            if empty:
                raise ValueError(f"{where}: no image: {empty[0]!r} is empty")
            near = [k for k in data if isinstance(k, str) and difflib.get_close_matches(k, keys, n=1, cutoff=0.75)]
            hint = f" (is '{near[0]}' meant to be one of them?)" if near else ""
            raise ValueError(f"{where}: no image; give one of {', '.join(keys)}{hint}")
        return []
    val = data[present[0]]
    vals = val if isinstance(val, list) else [val]
    out = []
    for v in vals:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: '{present[0]}' must be a path or a list of paths, got {v!r}")
        path = Path(v).expanduser()
        out.append(str(path if path.is_absolute() else (base / path)))
    return out


def _mark_duplicates(rows: list[ManifestRow]) -> None:
    first: dict[str, int] = {}
    for r in rows:
        if r.id in first:
            r.error = r.error or f"duplicate id {r.id!r} (first used on line {first[r.id]}); ids must be unique"
            r.item = None
        else:
            first[r.id] = r.line


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
