"""Browser test of the website: build it, open every page in headless Debian Chromium.

The site is built from the stored notebook outputs (no execution) into a temporary
folder, unless SIMBOOK_SITE names an already built html folder (e.g.
book/_build/html after `make book`).  Pages are served on 127.0.0.1 and opened with
Playwright driving /usr/bin/chromium (no browser download).  Screenshots go to a
temporary folder (printed), or to SIMBOOK_SCREENSHOTS if set.

Chapters listed in _toc.yml whose notebook does not exist yet are skipped (and
left out of the temporary build, which is then built without -W).
"""
from __future__ import annotations

import functools
import json
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
JUPYTER_BOOK = Path(sys.executable).parent / "jupyter-book"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DIRECTIVE_TEXT = re.compile(r"#\s*\|\s*(default_exp|export|exporti|exports|hide)\b")
RAW_TEX = ("\\(", "\\)", "\\[", "\\]", "$$")


def _toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    chapters = [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]
    chapters += [c["file"] for c in toc.get("chapters", [])]
    return toc, toc["root"], chapters


def _exists(docname: str) -> bool:
    return any((ROOT / f"{docname}{ext}").is_file() for ext in (".ipynb", ".md"))


def _n_figures(docname: str) -> int:
    """Number of image outputs stored in a chapter notebook."""
    path = ROOT / f"{docname}.ipynb"
    if not path.is_file():
        return 0
    nb = json.loads(path.read_text(encoding="utf-8"))
    return sum(any(k.startswith("image/") for k in o.get("data", {}))
               for c in nb["cells"] for o in c.get("outputs", []))


TOC, ROOT_PAGE, CHAPTERS = _toc()
MISSING = [c for c in CHAPTERS if not _exists(c)]


def _filtered_toc(toc: dict) -> dict:
    toc = yaml.safe_load(yaml.safe_dump(toc))
    for part in toc.get("parts", []):
        part["chapters"] = [c for c in part["chapters"] if c["file"] not in MISSING]
    toc["parts"] = [p for p in toc.get("parts", []) if p["chapters"]]
    if "chapters" in toc:
        toc["chapters"] = [c for c in toc["chapters"] if c["file"] not in MISSING]
    return toc


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    if os.environ.get("SIMBOOK_SITE"):
        site = Path(os.environ["SIMBOOK_SITE"]).resolve()
        assert (site / "index.html").is_file(), f"SIMBOOK_SITE={site} has no index.html"
        return site
    out = tmp_path_factory.mktemp("site")
    toc = ROOT / "_toc.yml"
    strict = ["-W"]
    if MISSING:
        toc = out / "_toc.yml"
        toc.write_text(yaml.safe_dump(_filtered_toc(TOC), sort_keys=False), encoding="utf-8")
        strict = []  # links to the missing chapters would be warnings
    r = subprocess.run(
        [str(JUPYTER_BOOK), "build", str(ROOT), "--config", str(ROOT / "book" / "_config.yml"),
         "--toc", str(toc), "--path-output", str(out), "--all", *strict],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert r.returncode == 0, f"jupyter-book build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out / "_build" / "html"


@pytest.fixture(scope="session")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("SIMBOOK_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {d}")
    return d


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: run `make venv` (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # fresh --user-data-dir
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        yield ctx
        ctx.close()


def _open(browser, url: str):
    """Open `url`; return (page, problems) where problems lists failed/foreign requests."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and not r.url.endswith("favicon.ico")
            and problems.append(f"HTTP {r.status}: {r.url}"))
    page.on("request", lambda r: not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
            and problems.append(f"off-site request: {r.url}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url, wait_until="load")
    return page, problems


def _wait_for_mathjax(page):
    # Sphinx loads MathJax only on pages that have math
    if page.locator("script[src*='mathjax']").count() == 0:
        assert page.locator(".math").count() == 0, "math on the page but no MathJax script"
        return
    src = page.locator("script[src*='mathjax']").first.get_attribute("src")
    assert src.startswith("../_static/mathjax/") or src.startswith("_static/mathjax/"), src
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                           timeout=30_000)
    page.evaluate("() => MathJax.startup.promise.then(() => true)")


# text of the article outside code cells and literals (code may contain "\(" or "$$")
_PROSE_JS = """() => {
  const a = document.querySelector('article') || document.body;
  const c = a.cloneNode(true);
  c.querySelectorAll('pre, code, script, style, .cell_output, .highlight').forEach(e => e.remove());
  return c.innerText;
}"""


# (longest line in characters, scrollWidth, clientWidth) of every code cell's source block
_CODE_WIDTH_JS = """() => [...document.querySelectorAll('article div.cell_input pre')].map(p => [
  Math.max(...p.innerText.split('\\n').map(line => line.length)), p.scrollWidth, p.clientWidth])"""

# Draw two different CJK characters of the page's text in the font its paragraph uses: a missing font gives the
# same empty box ("tofu") for both, real glyphs differ. Returns [font, characters, differ, not blank] or null.
_CJK_GLYPHS_JS = """() => {
  const el = [...document.querySelectorAll('article p, article td, article li')]
      .find(e => (e.innerText.match(/[\\u4e00-\\u9fff]/g) || []).length >= 2);
  if (!el) return null;
  const chars = [...new Set(el.innerText.match(/[\\u4e00-\\u9fff]/g))].slice(0, 2);
  const font = getComputedStyle(el).fontFamily;
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 64;
  const ctx = canvas.getContext('2d');
  const draw = ch => { ctx.clearRect(0, 0, 64, 64); ctx.font = '40px ' + font; ctx.fillText(ch, 8, 48);
                       return Array.from(ctx.getImageData(0, 0, 64, 64).data); };
  const a = draw(chars[0]), b = draw(chars[1]);
  return [font, chars.join(''), a.join() !== b.join(), a.some(v => v !== 0)];
}"""

PAGES = [ROOT_PAGE, *CHAPTERS]


@pytest.mark.parametrize("docname", PAGES)
def test_page(docname, browser, server, shots):
    if docname in MISSING:
        pytest.skip(f"{docname}.ipynb does not exist yet")
    page, problems = _open(browser, f"{server}/{docname}.html")
    try:
        _wait_for_mathjax(page)
        page.wait_for_function(
            "() => [...document.images].every(i => i.complete)", timeout=30_000)
        name = docname.replace("/", "_")
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

        assert not problems, "\n".join(problems)
        title = page.title()
        assert "simbook" in title, title

        # math: every math element typeset by the vendored MathJax, no raw TeX left
        n_math = page.locator("article .math").count()
        n_mjx = page.locator("article mjx-container").count()
        if docname == ROOT_PAGE:
            assert n_math > 0, "the intro has math: the test must see it"
        assert n_mjx >= n_math, f"{n_math} math elements but {n_mjx} typeset"
        prose = page.evaluate(_PROSE_JS)
        raw = [t for t in RAW_TEX if t in prose]
        assert not raw, f"raw TeX delimiters left in the text: {raw}"

        # no nbdev directives visible anywhere (code included)
        body = page.inner_text("body")
        assert not DIRECTIVE_TEXT.search(body), DIRECTIVE_TEXT.search(body).group(0)

        widths = page.eval_on_selector_all("article img", "imgs => imgs.map(i => i.naturalWidth)")
        assert all(w > 0 for w in widths), f"broken image(s) on {docname}: {widths}"
        if docname != ROOT_PAGE:
            # chapters with figures stored in the notebook must show them
            if _n_figures(docname):
                assert widths, f"{docname}.ipynb has {_n_figures(docname)} figure(s), the page none"
            exports = "#| default_exp" in (ROOT / f"{docname}.ipynb").read_text(encoding="utf-8")
            assert page.locator("article .nbdev-exports").count() == int(exports), \
                "no 'This chapter exports' note" if exports else "an exports note on a page that exports nothing"
            # the content column fits the book's code width: a line of <= 110 characters does not scroll sideways
            for longest, scroll, client in page.evaluate(_CODE_WIDTH_JS):
                if longest <= 110:
                    assert scroll <= client + 2, f"a code cell with lines of {longest} characters scrolls " \
                                                 f"({scroll} px of content in {client} px)"
            assert re.search(r"^\d+\.\s", page.locator("article h1").first.inner_text()), \
                "chapter title is not numbered"
            # private helpers are folded: closed <details> with a visible summary that names them
            folded = page.locator("article details.nbdev-private")
            for i in range(folded.count()):
                assert folded.nth(i).get_attribute("open") is None, "a folded helper is open"
                summary = folded.nth(i).locator("summary")
                assert summary.is_visible() and summary.inner_text().startswith("private helpers: _")
    finally:
        page.close()


def test_search(browser, server, shots):
    present = [c for c in CHAPTERS if c not in MISSING]
    if not present:
        pytest.skip("no chapter notebook exists yet")
    chapter = present[0]
    # a word from the chapter's own rendered text: the longest word of its title
    page, problems = _open(browser, f"{server}/{chapter}.html")
    heading = re.sub(r"^[\d.\s]+", "", page.locator("article h1").first.inner_text())
    page.close()
    word = max(re.findall(r"[A-Za-z]{4,}", heading), key=len).lower()

    page, problems = _open(browser, f"{server}/search.html?q={word}")
    try:
        page.wait_for_selector("#search-results ul.search li", timeout=30_000)
        page.screenshot(path=str(shots / "search.png"), full_page=True)
        hrefs = page.eval_on_selector_all(
            "#search-results ul.search li a", "as => as.map(a => a.getAttribute('href'))")
        assert any(chapter.split("/")[-1] in (h or "") for h in hrefs), (word, hrefs)
        assert not problems, "\n".join(problems)
    finally:
        page.close()


def test_chinese_text_renders_with_glyphs(browser, server, shots):
    """Chinese in the prose (the SimBERT chapter's examples) is drawn with real glyphs, not empty boxes: the site
    test's browser has a CJK font (`make venv` installs Debian's fonts-wqy-zenhei beside chromium)."""
    chapter = next((c for c in CHAPTERS if "simbert" in c and c not in MISSING), None)
    if chapter is None:
        pytest.skip("no SimBERT chapter")
    page, problems = _open(browser, f"{server}/{chapter}.html")
    try:
        result = page.evaluate(_CJK_GLYPHS_JS)
        assert result is not None, f"no Chinese text found in the prose of {chapter}"
        font, chars, differ, drawn = result
        assert drawn and differ, f"{chars!r} in font {font} render as identical boxes: no CJK font for chromium"
    finally:
        page.close()
