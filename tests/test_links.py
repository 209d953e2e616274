"""Every relative link of the READMEs and the docs points to a file of the checkout, and every
in-page anchor (``#section``) to a heading of the page it names."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *ROOT.glob("results/**/README.md"), *ROOT.glob("docs/*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def links(text: str) -> list[str]:
    """Targets of the markdown links and images outside code (fenced blocks, inline code)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    heads = re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def broken(text: str, folder: pathlib.Path) -> list[str]:
    """The links of ``text``, a page in ``folder``, that name no file of the checkout or no
    heading of the page they name."""
    bad = []
    for target in links(text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:: not checked offline
        path, _, anchor = target.partition("#")
        dest = (folder / path).resolve()
        if not path:
            found = anchor in anchors(text)
        elif not dest.exists() or ROOT not in dest.parents:
            found = False
        else:
            found = not anchor or dest.suffix != ".md" or anchor in anchors(dest.read_text())
        if not found:
            bad.append(target)
    return bad


def test_the_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "results/README.md", "docs/experiments.md", "docs/gpu.md",
            "docs/performance.md", "docs/method.md", "docs/protocol.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    text = page.read_text()
    assert links(text) or page != ROOT / "README.md", "the README links nowhere"
    bad = broken(text, page.parent)
    assert not bad, f"{page.relative_to(ROOT)}: broken links {bad}"


def test_the_checker_sees_broken_links():
    """A missing file, a missing anchor (in the page or in another) and a path out of the
    checkout are broken; links inside code do not count."""
    text = ("# A page\n[ok](method.md) [ok](#a-page) [ok](../README.md#results) "
            "`[code](nowhere.md)`\n[gone](nowhere.md) [anchor](method.md#no-such-heading) "
            "[here](#no-such-heading) [out](../../etc/passwd)\n")
    assert broken(text, ROOT / "docs") == ["nowhere.md", "method.md#no-such-heading",
                                           "#no-such-heading", "../../etc/passwd"]
