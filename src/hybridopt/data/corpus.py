"""Text corpora as lists of documents: the embedded default and local user files.

The embedded default is real English that ships with every Python installation:

* the Python documentation topics (`pydoc_data.topics`), one document per topic;
* the docstrings of the standard-library modules, one document per module, read with `ast`
  (the modules are never imported).

Extraction is deterministic (sorted paths, source order). The train/validation split is made
per document from a hash of its id, so a document never straddles the two splits and adding a
file does not reshuffle the others.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path


# Folders of the standard library whose docstrings are tests, demos or vendored copies.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
     "ensurepip", "__pycache__", "__phello__"}
)
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Plain-text files are cut at blank lines into documents of at least this many characters,
# so one long file still gives a document-level validation split.
_TXT_DOC_CHARS = 2000
# The largest corpus file read: a file is read whole (and its text held as str, up to 4 bytes a character), so
# a bigger one is refused before any byte is read; split it into several files instead.
MAX_FILE_BYTES = 2 << 30  # 2 GiB


@dataclass(frozen=True)
class Document:
    """One unit of the train/validation split: `id` is stable across runs and machines."""

    id: str
    text: str


def embedded_corpus() -> list[Document]:
    """The default corpus: pydoc topics plus standard-library docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [Document(f"pydoc/{name}", topics[name].strip()) for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(root) / name
            text = _module_docstrings(path)
            if text:
                docs.append(Document(f"stdlib/{path.relative_to(stdlib).as_posix()}", text))
    return [d for d in docs if d.text]


def _module_docstrings(path: Path) -> str:
    """All docstrings of one module (module, classes, functions) in source order."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []
    for node in _walk_in_order(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def _walk_in_order(node: ast.AST):
    """Depth-first, source-order traversal (`ast.walk` is breadth-first)."""
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _walk_in_order(child)


def check_splittable(docs: list[Document]) -> None:
    """Raise ValueError unless `docs` can give a non-empty train and validation split (2 documents or more)."""
    if len(docs) < 2:
        raise ValueError(f"the corpus has {len(docs)} document(s); at least 2 are needed to hold one out for "
                         "validation, add more text")


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, validation) by a hash of each id.

    Both splits are non-empty when there are at least two documents.
    """
    assert 0.0 < val_fraction < 1.0
    train, val = [], []
    for doc in docs:
        h = int.from_bytes(hashlib.sha1(doc.id.encode()).digest()[:8], "big") / 2**64
        (val if h < val_fraction else train).append(doc)
    check_splittable(docs)
    if not val:
        val.append(train.pop())
    if not train:
        train.append(val.pop())
    return train, val


def load_documents(paths: list[str]) -> list[Document]:
    """Read local `.txt`, `.jsonl` (a `text` field per line) and `.parquet` (a `text` column) files.

    Directories are searched recursively for those suffixes. Only regular files are read (a named pipe or a
    device, even behind a link, would block or never end), each at most `MAX_FILE_BYTES`. Every user error
    (missing path, not a regular file, too large, binary or non-UTF-8 file, no text) raises `ValueError`
    naming the file, before any file is read for the first two.
    """
    files: list[Path] = []
    roots: list[Path] = []  # what each argument names: the folder itself, or the file's folder
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ValueError(f"path '{raw}' does not exist")
        if path.is_dir():
            # Not `is_file()`: a pipe or device named like a corpus file is refused below, not skipped unseen.
            found = sorted(p for p in path.rglob("*")
                           if p.suffix.lower() in SUPPORTED_SUFFIXES and p.exists() and not p.is_dir())
            if not found:
                raise ValueError(f"directory '{raw}' holds no {', '.join(SUPPORTED_SUFFIXES)} files")
            files.extend(found)
            roots.append(path)
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append(path)
            roots.append(path.parent)
        else:
            raise ValueError(
                f"file '{raw}' has an unsupported suffix; use {', '.join(SUPPORTED_SUFFIXES)}"
            )
    for path in files:  # before reading any: opening a pipe blocks until someone writes to it
        _check_regular_file(path)
    # Ids name each file relative to the arguments' common folder, not where it lies: the same files
    # give the same train/validation split from any folder or machine, and files of the same name given
    # from different folders keep distinct ids.
    common = os.path.commonpath([r.absolute() for r in roots])
    docs: list[Document] = []
    for path in files:
        name = Path(os.path.relpath(path.absolute(), common)).as_posix()
        suffix = path.suffix.lower()
        if suffix == ".txt":
            new = _read_txt(path)
        elif suffix == ".jsonl":
            new = _read_jsonl(path)
        else:
            new = _read_parquet(path)
        if not new:
            raise ValueError(f"file '{path}' contains no text")
        docs.extend(Document(name + d.id[len(str(path)):], d.text) for d in new)
    return docs


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _check_regular_file(path: Path) -> None:
    """Raise ValueError unless `path` (links followed) is a regular file of at most `MAX_FILE_BYTES`; opens nothing."""
    try:
        st = os.stat(path)  # follows links: /dev/zero behind data.txt is a device
    except OSError as e:
        raise ValueError(f"cannot read file '{path}': {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        target = f" (a link to '{os.path.realpath(path)}')" if os.path.islink(path) else ""
        raise ValueError(f"'{path}'{target} is {kind}, not a regular file; pass a regular "
                         f"{', '.join(SUPPORTED_SUFFIXES)} file")
    if st.st_size > MAX_FILE_BYTES:
        raise ValueError(f"file '{path}' is {st.st_size / 2**30:.1f} GiB, over the {MAX_FILE_BYTES / 2**30:g} GiB a "
                         "corpus file may hold; split it into smaller files (a folder of them may be passed)")


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # a file that grew since it was checked still stops at the limit
    except OSError as e:
        raise ValueError(f"cannot read file '{path}': {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"file '{path}' is over the {MAX_FILE_BYTES / 2**30:g} GiB a corpus file may hold; "
                         "split it into smaller files (a folder of them may be passed)")
    return data


def _decode(path: Path, data: bytes) -> str:
    if b"\x00" in data[:65536]:
        raise ValueError(f"file '{path}' looks binary (it contains NUL bytes); pass a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"file '{path}' is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it, e.g. with iconv -t UTF-8"
        ) from None


def _read_txt(path: Path) -> list[Document]:
    text = _decode(path, _read_bytes(path))
    docs, chunk, size = [], [], 0
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        chunk.append(para)
        size += len(para)
        if size >= _TXT_DOC_CHARS:
            docs.append(Document(f"{path}#{len(docs)}", "\n\n".join(chunk)))
            chunk, size = [], 0
    if chunk:
        docs.append(Document(f"{path}#{len(docs)}", "\n\n".join(chunk)))
    return docs


def _read_jsonl(path: Path) -> list[Document]:
    text = _decode(path, _read_bytes(path))
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"file '{path}' line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"file '{path}' line {lineno} has no string field 'text'")
        if record["text"].strip():
            docs.append(Document(f"{path}:{lineno}", record["text"].strip()))
    return docs


def _read_parquet(path: Path) -> list[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise ValueError(f"file '{path}' has no 'text' column (columns: {', '.join(schema.names)})")
        column = pq.read_table(path, columns=["text"]).column("text")
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"file '{path}' is not a readable Parquet file ({e})") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(f"file '{path}' column 'text' holds {column.type}, not strings")
    return [
        Document(f"{path}@{i}", t.strip()) for i, t in enumerate(column.to_pylist()) if t and t.strip()
    ]


def corpus_fingerprint(docs: list[Document]) -> str:
    """A short hash of ids and texts, to key caches."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.id.encode())
        h.update(b"\0")
        h.update(doc.text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
