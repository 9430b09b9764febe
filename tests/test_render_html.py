"""HTML renderer: a real, self-contained page, checked by parsing it with html.parser."""

from __future__ import annotations

from dataclasses import replace
from html.parser import HTMLParser

from test_render_terminal import failing_case, passing_case, sample_report

from gradverify.render.html import render_html
from gradverify.report import Report

VOID = {"meta", "br", "link", "img", "input", "hr"}


class Page(HTMLParser):
    """The page as a tree of (tag, attrs, children, text) with a check that every tag is closed."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root: dict = {"tag": "#root", "attrs": {}, "children": [], "text": ""}
        self.stack = [self.root]
        self.feed(text)
        self.close()
        assert len(self.stack) == 1, [n["tag"] for n in self.stack]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = {"tag": tag, "attrs": dict(attrs), "children": [], "text": ""}
        self.stack[-1]["children"].append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1]["tag"] == tag, (self.stack[-1]["tag"], tag)
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        for node in self.stack:
            node["text"] += data

    def find(self, tag: str, node: dict | None = None, **attrs: str) -> list[dict]:
        node = node or self.root
        found = []
        for child in node["children"]:
            if child["tag"] == tag and all(child["attrs"].get(k) == v for k, v in attrs.items()):
                found.append(child)
            found += self.find(tag, child, **attrs)
        return found


def test_page_is_self_contained_and_well_formed() -> None:
    text = render_html(sample_report(), title="run <42>")
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>")
    assert page.find("title")[0]["text"] == "run <42>"
    assert not page.find("script") and not page.find("link") and not page.find("img")
    assert "http://" not in text and "https://" not in text
    assert page.find("style")  # inline CSS


def test_summary_links_to_one_collapsible_section_per_case() -> None:
    report = sample_report()
    page = Page(render_html(report))
    sections = page.find("section")
    assert len(sections) == len(report.cases)
    ids = [s["attrs"]["id"] for s in sections]
    (summary,) = page.find("table", **{"class": "summary"})
    links = [a["attrs"]["href"] for a in page.find("a", summary)]
    assert links == [f"#{i}" for i in ids]
    details = [page.find("details", s)[0] for s in sections]
    # failing and error cases are open; the passing and skipped ones are collapsed
    assert ["open" in d["attrs"] for d in details] == [True, False, False, True]
    assert "FAIL" in page.find("summary", sections[0])[0]["text"]


def test_heatmap_is_a_coloured_table_and_entries_a_table() -> None:
    page = Page(render_html(Report(cases=(failing_case(),))))
    (heat,) = page.find("table", **{"class": "heatmap"})
    rows = page.find("tr", heat)
    assert len(rows) == 9
    first = [td["attrs"]["class"] for td in page.find("td", rows[0])]
    assert first == ["ho", "hz", "hz", "hX sep", "hz", "hz", "hX sep", "hz", "hz"]  # o..|X..|X..
    assert "∂out (3,3) / ∂x (3,3)" in page.find("caption", heat)[0]["text"]
    (entries,) = page.find("table", **{"class": "entries"})
    body_rows = page.find("tr", page.find("tbody", entries)[0])
    assert len(body_rows) == 18
    cells = [td["text"] for td in page.find("td", body_rows[0])]
    assert cells[:4] == ["∂out[0,0]/∂x[1,0]", "-0.09", "0", "0.09"]
    text = page.root["text"]
    assert "missing_offdiag" in text and "evidence: 18/18" in text and "hint: each output depends" in text
    assert "gradverify check specs/column_normalize_buggy.py" in page.find("pre")[0]["text"]


def test_user_text_is_escaped() -> None:
    case = failing_case(op="Norm<script>alert(1)</script>", repro="gradverify check 'a&b' \"<x>\"")
    page_text = render_html(Report(cases=(case, passing_case(op="Lin[a]&<b>"))))
    page = Page(page_text)
    assert not page.find("script")
    assert "Norm<script>alert(1)</script>" in page.root["text"] and "Lin[a]&<b>" in page.root["text"]
    assert "gradverify check 'a&b' \"<x>\"" in page.root["text"]


def test_max_entries_cuts_the_table_with_the_true_count() -> None:
    page = Page(render_html(Report(cases=(replace(failing_case()),)), max_entries=3))
    (entries,) = page.find("table", **{"class": "entries"})
    assert len(page.find("tr", page.find("tbody", entries)[0])) == 3
    assert "… 15 more: --output json:FILE lists all 18" in page.root["text"]
