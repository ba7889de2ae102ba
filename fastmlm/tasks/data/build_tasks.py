"""Rebuild the two bundled fine-tuning tasks from Debian's ``python3.11-doc`` (not run at training time).

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb pydoc
    python fastmlm/tasks/data/build_tasks.py pydoc/usr/share/doc/python3.11/html fastmlm/tasks/data

Both tasks read the pages and paragraphs that fastmlm/corpus/build_corpus.py reads (its
extractor, its page filter, its split rule), so their validation pages are the corpus's
validation pages and a model pretrained on the corpus's training split has never seen them.

- ``docs-section.{train,valid}.jsonl.gz``: one line per section, ``{"text", "label", "page"}``;
  the text is the section's prose (its first MAX_SECTION_WORDS words), the label the top-level
  part of the documentation its page is in (PARTS: small parts merged, the rest dropped).
- ``code-entities.{train,valid}.jsonl.gz``: one line per sentence that holds at least one
  cross-reference, ``{"tokens", "tags", "page"}``; tokens are the whitespace-separated words
  of the prose, a cross-reference (``<code class="xref py py-ROLE">``) always its own token(s),
  tagged ``B-ROLE`` / ``I-ROLE`` (ROLES), everything else ``O``.
"""
from __future__ import annotations

import collections
import gzip
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "corpus"))  # build_corpus.py, run from a checkout
from build_corpus import ProseExtractor, corpus_pages, read_page  # noqa: E402

MAX_SECTION_WORDS = 128  # a classifier reads at most this much of a section (fine-tuning rows are 128 tokens)
MAX_SENTENCE_TOKENS = 64  # longer sentences are cut into pieces of this many words
# Top-level folder of a page -> its class; folders of a page or two are merged into a neighbour.
PARTS = {"library": "library", "c-api": "c-api", "reference": "reference", "tutorial": "tutorial",
         "howto": "howto", "whatsnew": "whatsnew", "faq": "faq", "extending": "extending", "using": "using",
         "distutils": "distributing", "distributing": "distributing", "install": "distributing",
         "installing": "distributing"}  # dropped: top-level pages (glossary, about, index) and includes/
# Sphinx's Python roles -> tag names; py:const is merged into data (both are module-level values).
ROLES = {"func": "func", "meth": "meth", "class": "class", "exc": "exc", "mod": "mod", "attr": "attr",
         "data": "data", "const": "data"}
_ROLE = re.compile(r"\bpy-(" + "|".join(ROLES) + r")\b")


class MarkedProseExtractor(ProseExtractor):
    """build_corpus's extractor, also keeping each kept paragraph as (text, role or None) pieces."""

    def __init__(self):
        super().__init__()
        self.marked: list[list[tuple[str, str | None]]] = []  # kept paragraphs, in order
        self.pieces: list[tuple[str, str | None]] = []
        self.role, self.code_depth = None, 0

    def handle_starttag(self, tag, attrs):
        if tag == "p" and self.in_body:
            self.pieces = []
        if tag == "code":
            self.code_depth += 1
            match = _ROLE.search(dict(attrs).get("class") or "")
            if match and "xref" in (dict(attrs).get("class") or ""):
                self.role = ROLES[match.group(1)]
        super().handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "code" and self.code_depth:
            self.code_depth -= 1
            if not self.code_depth:
                self.role = None
        kept = sum(map(len, self.sections))
        super().handle_endtag(tag)
        if tag == "p" and sum(map(len, self.sections)) > kept:  # the parent kept this paragraph
            self.marked.append(self.pieces)

    def handle_data(self, data):
        if self.in_p and not self.skip:
            self.pieces.append((data, self.role))
        super().handle_data(data)


def tagged_tokens(pieces) -> tuple[list[str], list[str]]:
    """Paragraph pieces -> (tokens, BIO tags); a cross-reference is always a token of its own."""
    tokens, tags, previous_role, glue = [], [], None, False
    for text, role in pieces:
        words = text.split()
        if not words:
            glue = False
            continue
        for i, word in enumerate(words):
            joined = glue and i == 0 and not text[0].isspace() and role == previous_role
            if joined:  # a word split over two pieces of the same kind: "<em>foo</em>bar"
                tokens[-1] += word
                continue
            if role is None:
                tags.append("O")
            else:
                tags.append(f"I-{role}" if (i > 0 or (glue and not text[0].isspace())) and
                            role == previous_role and tags and tags[-1] != "O" else f"B-{role}")
            tokens.append(word)
        glue, previous_role = not text[-1].isspace(), role
    return tokens, tags


def sentences(tokens, tags):
    """Cut a paragraph at words ending a sentence (and every MAX_SENTENCE_TOKENS words)."""
    start = 0
    for i, (token, tag) in enumerate(zip(tokens, tags)):
        if (tag == "O" and token[-1] in ".?!" and i + 1 < len(tokens)) or i + 1 - start == MAX_SENTENCE_TOKENS:
            yield tokens[start:i + 1], tags[start:i + 1]
            start = i + 1
    if start < len(tokens):
        yield tokens[start:], tags[start:]


def main(html_root: str, out_dir: str) -> None:
    root, out = Path(html_root), Path(out_dir)
    rows = {(task, split): [] for task in ("docs-section", "code-entities") for split in ("train", "valid")}
    for page, rel, split in corpus_pages(root):
        parser = read_page(page, MarkedProseExtractor())
        part = PARTS.get(rel.split("/")[0]) if "/" in rel else None
        if part is not None:
            for section in (s for s in parser.sections if s):
                words = " ".join(section).split()[:MAX_SECTION_WORDS]
                rows["docs-section", split].append({"text": " ".join(words), "label": part, "page": rel})
        for pieces in parser.marked:
            for tokens, tags in sentences(*tagged_tokens(pieces)):
                if any(t != "O" for t in tags):
                    rows["code-entities", split].append({"tokens": tokens, "tags": tags, "page": rel})
    for (task, split), lines in rows.items():
        with gzip.open(out / f"{task}.{split}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        counts = collections.Counter(line["label"] for line in lines) if task == "docs-section" else \
            collections.Counter(t[2:] for line in lines for t in line["tags"] if t.startswith("B-"))
        pages = len({line["page"] for line in lines})
        print(f"{task}.{split}: {len(lines)} examples from {pages} pages; "
              + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
