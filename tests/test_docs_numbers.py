"""The result tables quoted in the docs are the result files' tables (rendered by benchmarks/render_docs.py)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_docs  # noqa: E402


def test_every_quoted_table_is_its_files_table():
    assert render_docs.stale_blocks() == []
    blocks = sum(len(list(render_docs.BLOCK.finditer((ROOT / doc).read_text(encoding="utf-8"))))
                 for doc in render_docs.DOCS)
    assert blocks >= 8  # the sweep, correction, claims and ledger tables


def test_a_hand_edited_table_is_caught(tmp_path, monkeypatch):
    source = tmp_path / "table.md"
    source.write_text("| a | b |\n|---|---|\n| 1 | 2 |\n\nnote\n")
    doc = tmp_path / "doc.md"
    doc.write_text(f"text\n<!-- rendered from {source.name} -->\n| a | b |\n|---|---|\n| 1 | 3 |\n<!-- end rendered -->\n")
    monkeypatch.setattr(render_docs, "ROOT", tmp_path)
    monkeypatch.setattr(render_docs, "DOCS", ["doc.md"])
    assert render_docs.stale_blocks() == [f"doc.md: {source.name}"]
    assert "| 1 | 2 |" in render_docs.render(doc.read_text()) and "note" not in render_docs.render(doc.read_text())
