"""Rebuild the bundled corpus from Debian's ``python3.11-doc`` package (not run at training time).

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb pydoc
    python fastmlm/corpus/build_corpus.py pydoc/usr/share/doc/python3.11/html fastmlm/corpus

Keeps the prose of the rendered HTML pages: the text of every ``<p>`` element
(code listings, tables of contents, navigation and index pages are dropped).
Each section (a run of paragraphs under one heading) becomes one document;
paragraphs are written one per line, documents are separated by a blank line.
Pages go to the validation split when ``crc32(path) % 100 < VALID_PERCENT`` (5), so
the split is stable and no page is shared between the splits. fastmlm/tasks/data/build_tasks.py
reads the same pages with the same split (:func:`corpus_pages`, :func:`read_page`).
"""
from __future__ import annotations

import gzip
import html.parser
import re
import sys
import zlib
from pathlib import Path

VALID_PERCENT = 5  # share of the pages, by a hash of their path, that go to the validation split
SKIP_PAGES = ("genindex", "py-modindex", "search", "contents", "bugs", "copyright", "license", "download")


class ProseExtractor(html.parser.HTMLParser):
    """Collect paragraph text per section of one Sphinx page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.in_body = 0       # depth inside <div role="main"> (or class="body")
        self.in_p = 0
        self.skip = 0          # inside <pre>/<script>/<style>
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and (attrs.get("role") == "main" or attrs.get("class") == "body"):
            self.in_body += 1
        elif tag == "div" and self.in_body:
            self.in_body += 1
        if not self.in_body:
            return
        if tag in ("pre", "script", "style"):
            self.skip += 1
        elif tag in ("h1", "h2", "h3", "h4") and self.sections[-1]:
            self.sections.append([])
        elif tag == "p":
            self.in_p, self.text = 1, []

    def handle_endtag(self, tag):
        if tag == "div" and self.in_body:
            self.in_body -= 1
        elif tag in ("pre", "script", "style") and self.skip:
            self.skip -= 1
        elif tag == "p" and self.in_p:
            self.in_p = 0
            paragraph = re.sub(r"\s+", " ", "".join(self.text)).strip()
            if len(paragraph.split()) >= 5:  # drop labels like "Changed in version 3.2."
                self.sections[-1].append(paragraph)

    def handle_data(self, data):
        if self.in_p and not self.skip:
            self.text.append(data)


def read_page(path: Path, parser: ProseExtractor | None = None) -> ProseExtractor:
    """``parser`` (a fresh ProseExtractor by default) after it has read the page at ``path``."""
    parser = parser if parser is not None else ProseExtractor()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def page_sections(path: Path) -> list[list[str]]:
    """The kept paragraphs of each section of one page (sections without any left out)."""
    return [s for s in read_page(path).sections if s]


def corpus_pages(root: Path, valid_percent: int = VALID_PERCENT):
    """(page, path relative to ``root``, "train" or "valid") of every page the corpus reads, in
    path order: the page filter and the split rule of the module docstring."""
    for page in sorted(root.rglob("*.html")):
        rel = page.relative_to(root).as_posix()
        if rel.startswith(("_", "whatsnew/changelog")) or page.stem in SKIP_PAGES:
            continue
        yield page, rel, "valid" if zlib.crc32(rel.encode()) % 100 < valid_percent else "train"


def main(html_root: str, out_dir: str, valid_percent: int = VALID_PERCENT) -> None:
    root, out = Path(html_root), Path(out_dir)
    splits = {"train": [], "valid": []}
    for page, _, split in corpus_pages(root, valid_percent):
        splits[split].extend("\n".join(section) for section in page_sections(page))
    for split, docs in splits.items():
        with gzip.open(out / f"{split}.txt.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            f.write("\n\n".join(docs) + "\n")
        words = sum(len(d.split()) for d in docs)
        print(f"{split}: {len(docs)} documents, {words} words")


if __name__ == "__main__":
    main(*sys.argv[1:3])
