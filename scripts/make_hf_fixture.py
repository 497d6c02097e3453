"""Write tests/fixtures/hf_sotu/: a real Hugging Face `datasets` save_to_disk folder (two Arrow shards).

Its documents are the documents of specs/data/sotu.jsonl.gz (51; at most 120) (US State of the
Union addresses, public domain; see specs/data/SOURCES.md), each cut to 1000 characters,
with an `id` column beside `text`. tests/test_formats.py derives the same documents
from specs/data and checks that rbridge reads exactly these from the folder.

    pip install datasets && python scripts/make_hf_fixture.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rbridge.data.sources import SourceConfig, iter_documents

ROOT = Path(__file__).resolve().parents[1]
N_DOCS, MAX_CHARS = 120, 1000


def fixture_docs() -> list[str]:
    docs = []
    for doc in iter_documents(SourceConfig("sotu", path=ROOT / "specs/data/sotu.jsonl.gz")):
        docs.append(doc[:MAX_CHARS])
        if len(docs) == N_DOCS:
            return docs
    return docs


if __name__ == "__main__":
    import datasets  # only to write the fixture: not a dependency of rbridge or its tests

    out = ROOT / "tests/fixtures/hf_sotu"
    shutil.rmtree(out, ignore_errors=True)
    docs = fixture_docs()
    ds = datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    ds.save_to_disk(str(out), num_shards=2)
    print(f"wrote {out} ({len(docs)} documents, datasets {datasets.__version__})")
