"""Knowledge-base documents: text out of an upload (txt, md, pdf, html) and the chunks that are embedded.

Chunks are small (a heading path plus ~40 words) because what a chunk is for is to sit in front of a
small LLM's answer: one fact-dense paragraph reads better than a page.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from models.llm import split_sentences

CONTENT_TYPES = {"text/plain": "txt", "text/markdown": "md", "text/x-markdown": "md", "application/pdf": "pdf",
                 "text/html": "html", "application/xhtml+xml": "html"}
SUFFIXES = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".pdf": "pdf", ".html": "html", ".htm": "html"}
MAX_PDF_PAGES = 500
MAX_TEXT_CHARS = 2_000_000  # of extracted text: a bigger document is refused, not truncated silently


class DocumentError(ValueError):
    """The upload is not a document of its declared kind (or not one we read)."""


def kind_of(content_type: str | None, filename: str | None, data: bytes) -> str:
    """txt | md | pdf | html, from the declared type, then the file name; DocumentError if neither says."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in CONTENT_TYPES:
        return CONTENT_TYPES[ct]
    suffix = re.search(r"\.[A-Za-z]+$", filename or "")
    if suffix and suffix.group().lower() in SUFFIXES:
        return SUFFIXES[suffix.group().lower()]
    raise DocumentError(f"unknown document type {ct or '(none)'!r}: expected txt, md, pdf or html")


def extract_text(data: bytes, kind: str) -> str:
    if kind == "pdf":
        text = _pdf_text(data)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DocumentError(f"a {kind} document must be UTF-8 text") from None
        if "\x00" in text:
            raise DocumentError(f"a {kind} document must be text, not binary")
        if kind == "html":
            text = _html_text(text)
    if len(text) > MAX_TEXT_CHARS:
        raise DocumentError(f"the document has over {MAX_TEXT_CHARS} characters of text")
    if not text.strip():
        raise DocumentError("the document has no text")
    return text


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.startswith(b"%PDF-"):
        raise DocumentError("not a PDF file")
    try:
        reader = PdfReader(io.BytesIO(data))
        if len(reader.pages) > MAX_PDF_PAGES:
            raise DocumentError(f"a PDF of over {MAX_PDF_PAGES} pages")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, DocumentError):
            raise
        raise DocumentError("the PDF cannot be read") from None


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, with block elements as line breaks and headings marked for chunking."""

    BLOCKS = {"p", "div", "li", "tr", "br", "section", "article", "dt", "dd", "table", "ul", "ol", "details", "summary"}
    HIDDEN = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", ln).strip() for ln in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str  # what is embedded and what the LLM reads: "Heading > Sub: paragraph"


def chunk_text(text: str, max_words: int = 40) -> list[Chunk]:
    """Paragraphs (blank-line or list-item separated) under their markdown heading path, packed up to
    `max_words`; a longer paragraph is split at sentence ends."""
    heads: list[str] = []
    pieces: list[tuple[str, str]] = []  # (heading path, paragraph)
    para: list[str] = []

    def end_para() -> None:
        if para:
            pieces.append((" > ".join(heads), " ".join(para)))
            para.clear()

    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            end_para()
            depth = len(m.group(1))
            heads[:] = heads[:depth - 1] + [m.group(2).strip()]
        elif not line:
            end_para()
        elif re.match(r"^([-*\u2022]|\d+[.)]|\|)\s*", line):  # a list item or table row is a unit of its own
            end_para()
            para.append(re.sub(r"^([-*\u2022]|\d+[.)])\s+", "", line).strip("| ").replace(" | ", ": ", 1)
                        .replace(" | ", ", "))
            end_para()
        else:
            para.append(line)
    end_para()
    chunks: list[str] = []
    current_head, current = None, []
    for head, p in pieces:
        if re.fullmatch(r"[-:| ]+", p):  # a markdown table's separator row
            continue
        for sentence_group in _split_long(p, max_words):
            words = len(sentence_group.split())
            if current and (head != current_head or sum(len(x.split()) for x in current) + words > max_words):
                chunks.append(_with_head(current_head, current))
                current = []
            current_head = head
            current.append(sentence_group)
    if current:
        chunks.append(_with_head(current_head, current))
    return [Chunk(i, c) for i, c in enumerate(chunks)]


def _with_head(head: str | None, parts: list[str]) -> str:
    body = " ".join(parts)
    return f"{head}: {body}" if head else body


def _split_long(paragraph: str, max_words: int) -> list[str]:
    if len(paragraph.split()) <= max_words:
        return [paragraph]
    out, cur = [], []
    for s in re.split(r"(?<=[.!?])\s+", paragraph):
        if cur and len(" ".join(cur + [s]).split()) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur.append(s)
    if cur:
        out.append(" ".join(cur))
    return out


_STOPWORDS = frozenset(
    "a an the is are was were be been do does did i you we they he she it to of in on at for and or my your "
    "our me us what when where who how which can could would should will there this that with from by as if "
    "so not no any about".split())


def _content_words(text: str) -> set[str]:
    """Lower-case words without stop words, plural/verb 's' dropped ("costs" matches "cost")."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words if w not in _STOPWORDS}


def excerpt(passage: str, query: str, max_words: int) -> str:
    """The sentences of `passage` that share most words with `query`, in their order, within
    `max_words` (the best one is kept even if longer; others only if they share a word), under the
    passage's heading. A passage within the budget is returned whole. For a reply that reads a passage
    itself: every word is prompt processed before its first token."""
    if len(passage.split()) <= max_words:
        return passage
    head, sep, body = passage.partition(": ")
    if not sep or re.search(r"[.!?]", head):
        head, body = "", passage
    sentences = split_sentences(body.strip())
    asked = _content_words(query)
    shared = [len(_content_words(x) & asked) for x in sentences]
    ranked = sorted(range(len(sentences)), key=lambda i: (-shared[i], i))
    budget = max_words - len(head.split())
    keep: list[int] = []
    used = 0
    for i in ranked:
        n = len(sentences[i].split())
        if keep and (used + n > budget or not shared[i]):
            continue
        keep.append(i)
        used += n
    text = " ".join(sentences[i] for i in sorted(keep))
    return f"{head}: {text}" if head else text
