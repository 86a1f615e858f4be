import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hybridopt.data.corpus import Document, embedded_corpus, load_documents, split_documents


@pytest.fixture(scope="module")
def embedded():
    return embedded_corpus()


def test_embedded_corpus_is_deterministic_and_real(embedded):
    again = embedded_corpus()
    assert again == embedded
    ids = [d.id for d in embedded]
    assert len(set(ids)) == len(ids)
    assert any(i.startswith("pydoc/") for i in ids) and any(i.startswith("stdlib/") for i in ids)
    assert not any("/test/" in i or "site-packages" in i for i in ids)
    total = sum(len(d.text) for d in embedded)
    assert total > 500_000  # pydoc topics alone are ~0.5 MB
    json_doc = next(d for d in embedded if d.id == "stdlib/json/__init__.py")
    assert "JSON" in json_doc.text


def test_split_is_document_level_and_stable(embedded):
    train, val = split_documents(embedded, 0.05)
    assert {d.id for d in train}.isdisjoint({d.id for d in val})
    assert len(train) + len(val) == len(embedded)
    assert 0.02 < len(val) / len(embedded) < 0.09
    # Adding a document does not move any other document between splits.
    train2, val2 = split_documents(embedded + [Document("extra", "more text")], 0.05)
    assert {d.id for d in val} <= {d.id for d in val2}


def test_split_needs_two_documents():
    with pytest.raises(ValueError, match="at least 2"):
        split_documents([Document("a", "x")], 0.05)
    train, val = split_documents([Document("a", "x"), Document("b", "y")], 0.05)
    assert len(train) == len(val) == 1


def test_reads_txt_jsonl_parquet_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond one.\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "héllo wörld"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet", None, "  "]}), tmp_path / "c.parquet")
    docs = load_documents([str(tmp_path)])
    texts = [d.text for d in docs]
    assert texts == ["First paragraph.\n\nSecond one.", "héllo wörld", "two", "from parquet"]
    # Ids (and so the split) do not depend on where the files lie.
    assert [d.id for d in docs] == ["a.txt#0", "b.jsonl:1", "b.jsonl:3", "c.parquet@0"]
    moved = tmp_path / "elsewhere" / "data"
    moved.mkdir(parents=True)
    for f in ("a.txt", "b.jsonl", "c.parquet"):
        (moved / f).write_bytes((tmp_path / f).read_bytes())
    assert load_documents([str(moved)]) == docs
    assert [d.id for d in load_documents([str(moved / "a.txt")])] == ["a.txt#0"]
    # Files of the same name from two folders keep distinct ids.
    twice = load_documents([str(moved / "a.txt"), str(tmp_path / "a.txt")])
    assert [d.id for d in twice] == ["elsewhere/data/a.txt#0", "a.txt#0"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "contains no text"),
    ("blank.txt", b"\n \n\t\n", "contains no text"),
    ("bin.txt", b"\x7fELF\x00\x01\x02", "looks binary"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "not valid UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "line 2 is not valid JSON"),
    ("notext.jsonl", b'{"body": "x"}\n', "line 1 has no string field 'text'"),
    ("bad.parquet", b"PAR1 garbage", "not a readable Parquet file"),
    ("data.csv", b"text\nhello\n", "unsupported suffix"),
])
def test_bad_files_raise_one_clear_sentence(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        load_documents([str(path)])
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_documents([str(tmp_path / "x.parquet")])


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_documents([str(tmp_path / "nope.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_documents([str(tmp_path / "empty")])
