"""Citations resolve inside the repository: every `docs/<page>.md#anchor` cited in the code, tests,
scripts and notebooks names a page that exists and an anchor that page defines (an explicit
`<a id="...">` or a heading's GitHub slug), and no citation points outside the repository."""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("deepseek_v4", "kernels_pallas", "scripts", "tests", "notebooks")
# `docs/page.md#a` then any `, #b` that continue the same citation.
CITATION = re.compile(r"docs/([\w.-]+\.md)((?:#[\w-]+)(?:,\s*#[\w-]+)*)")


def _anchors(page: str) -> set[str]:
  with open(os.path.join(ROOT, "docs", page), encoding="utf-8") as f:
    text = f.read()
  ids = set(re.findall(r'<a id="([\w-]+)"></a>', text))
  for heading in re.findall(r"(?m)^#+\s+(.*)$", text):
    slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    ids.add(slug)
  return ids


def _files(suffixes: tuple[str, ...]):
  """The project's source files (this test's own file, which spells the patterns, left out)."""
  for top in SOURCES:
    for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
      dirs[:] = [d for d in dirs if d not in ("__pycache__", "data")]
      for name in files:
        path = os.path.join(folder, name)
        if name.endswith(suffixes) and os.path.abspath(path) != os.path.abspath(__file__):
          yield path


def _citations():
  for path in _files((".py", ".ipynb", ".sh", ".md")):
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        for m in CITATION.finditer(line):
          for anchor in re.findall(r"#([\w-]+)", m.group(2)):
            yield os.path.relpath(path, ROOT), lineno, m.group(1), anchor


def test_every_cited_anchor_exists():
  cited = list(_citations())
  assert len(cited) > 100  # the model's modules cite docs/architecture.md throughout
  pages: dict[str, set[str] | None] = {}
  bad = []
  for path, lineno, page, anchor in cited:
    if page not in pages:
      pages[page] = _anchors(page) if os.path.isfile(os.path.join(ROOT, "docs", page)) else None
    if pages[page] is None or anchor not in pages[page]:
      bad.append(f"{path}:{lineno}: docs/{page}#{anchor}")
  assert not bad, "citations that do not resolve:\n  " + "\n  ".join(bad)


def test_no_citation_leaves_the_repository():
  outside = []
  for path in _files((".py", ".ipynb")):
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if "shared/spec" in line or "../shared" in line:
          outside.append(f"{os.path.relpath(path, ROOT)}:{lineno}")
  assert not outside, "links outside the repository:\n  " + "\n  ".join(outside)


def test_anchor_reader_finds_ids_and_headings(tmp_path, monkeypatch):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "x.md").write_text('<a id="mhc"></a>\n## 2.2 Hyper-connections (mHC)\n')
  monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
  assert _anchors("x.md") == {"mhc", "22-hyper-connections-mhc"}
