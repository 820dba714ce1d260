"""The built book (book/_build/html, from ``make book``) in a real browser, served from 127.0.0.1 only.

Every page must load with no failed request, no request leaving the site (plotly.js, MathJax, fonts and
styles are all served from it), no console error and no uncaught exception; every plotly figure must be
drawn (SVG inside it), every formula typeset, and the chapters and solutions that have figures must show
them. A few screenshots land in book/_build/screenshots/ for a person to look at.

The browser is Debian's ``chromium`` driven by Playwright for Python (never ``playwright install``: no
download). ``make test`` builds the book and installs chromium where it can; elsewhere the test skips and
says what is missing.
"""

from __future__ import annotations

import functools
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
HTML = BOOK / "_build" / "html"
SCREENSHOTS = BOOK / "_build" / "screenshots"

# Pages that must show plotly figures: the chapters 00-04, 06, 07, 09, 10 and lab 4's solution (patterns, so
# that a chapter may be renamed). Any other page's figures are checked too, when it has some.
MUST_HAVE_FIGURES = [
    "notebooks/00_*.html",
    "notebooks/01_*.html",
    "notebooks/02_*.html",
    "notebooks/03_*.html",
    "notebooks/04_*.html",
    "notebooks/06_*.html",
    "notebooks/07_*.html",
    "notebooks/09_*.html",
    "notebooks/10_*.html",
    "notebooks/labs/solutions/lab4_*.html",
]
# Pages with typeset maths (MathJax served from _static/mathjax)
MUST_HAVE_MATHS = ["intro.html", "notebooks/00_*.html", "notebooks/06_*.html", "notebooks/labs/lab1_*.html"]
# (page pattern, screenshot name, what to scroll to: a CSS selector, or None for the top of the page)
SCREENSHOT_PAGES = [
    ("intro.html", "intro", None),
    ("notebooks/00_*.html", "00_tour", ".plotly-figure"),
    ("notebooks/00_*.html", "00_tour_explorer", ".explorer-note"),
    ("notebooks/04_*.html", "04_irope", ".plotly-figure"),
    ("notebooks/07_*.html", "07_multimodal", ".plotly-figure"),
    ("notebooks/labs/solutions/lab4_*.html", "lab4_solution", ".plotly-figure"),
    ("teachers_guide.html", "teachers_guide", None),
    ("api/l4lab.model.html", "api_model", None),
]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def built_pages() -> list[str]:
    """Every page of the site, relative to its root (theme templates under _static are not pages)."""
    if not (HTML / "intro.html").is_file():
        return []
    pages = (p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html"))
    return sorted(p for p in pages if not p.startswith(("_static/", "_sources/")))


PAGES = built_pages()
WHY_NOT_BUILT = f"the book is not built ({HTML.relative_to(BOOK.parent)} has no intro.html): run `make book`"


def matching(pattern: str) -> list[str]:
    return [page for page in PAGES if re.fullmatch(pattern.replace(".", r"\.").replace("*", "[^/]*"), page)]


REFRESH = re.compile(r'<meta http-equiv="refresh" content="\d+;\s*url=([^"]+)"', re.IGNORECASE)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """The built book served on 127.0.0.1 at a free port; yields its base URL."""
    if not PAGES:
        pytest.skip(WHY_NOT_BUILT)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(HTML)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed (pip install -e '.[dev]')"
    )
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("no chromium on the PATH (Debian: apt-get install chromium; make test does it as root)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def context(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    yield context
    context.close()


class Visit:
    """One page opened in the browser, with everything that went wrong on the way."""

    def __init__(self, context: object, base: str, page_path: str) -> None:
        self.base = base
        self.offsite: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        page = context.new_page()  # type: ignore[attr-defined]
        self.page = page
        page.on("request", self._request)
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.url} (HTTP {r.status})"))
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.goto(base + page_path, wait_until="load")
        redirect = REFRESH.search((HTML / page_path).read_text(encoding="utf-8"))
        if redirect:  # index.html only forwards to the first page: follow it
            page.wait_for_url(urljoin(base + page_path, redirect.group(1)))
            page.wait_for_load_state("load")
        # MathJax typesets after load; plotly draws at once but fonts and icons may follow
        page.evaluate(
            "() => (window.MathJax && MathJax.startup && MathJax.startup.promise) ? "
            "MathJax.startup.promise.then(() => true) : true"
        )
        page.wait_for_load_state("networkidle")

    def _request(self, request: object) -> None:
        url = request.url  # type: ignore[attr-defined]
        if urlsplit(url).scheme in ("data", "blob", "about"):
            return
        if not url.startswith(self.base):
            self.offsite.append(url)

    def count(self, selector: str) -> int:
        return self.page.locator(selector).count()

    def undrawn_figures(self) -> list[str]:
        """The ids of the plotly figure divs with no SVG inside."""
        return self.page.evaluate(
            "() => Array.from(document.querySelectorAll('.plotly-figure'))"
            ".filter(d => !d.querySelector('.main-svg')).map(d => d.id)"
        )


@pytest.mark.parametrize(
    "page_path", PAGES or [pytest.param("", marks=pytest.mark.skip(reason=WHY_NOT_BUILT))]
)
def test_every_page_loads_from_the_site_alone_without_errors(
    site: str, context: object, page_path: str
) -> None:
    visit = Visit(context, site, page_path)
    try:
        assert visit.offsite == [], f"{page_path} requested URLs outside 127.0.0.1"
        assert visit.failed == [], f"{page_path} has failed requests"
        assert visit.errors == [], f"{page_path} has errors"
        figures = visit.count(".plotly-figure")
        assert visit.undrawn_figures() == [], f"{page_path}: plotly figures left undrawn"
        assert visit.count(".plotly-figure .main-svg") >= figures
        if any(page_path in matching(p) for p in MUST_HAVE_FIGURES):
            assert figures > 0 and visit.count(".main-svg") > 0, f"{page_path} should show plotly figures"
        formulas = visit.count("span.math, div.math")
        if formulas or any(page_path in matching(p) for p in MUST_HAVE_MATHS):
            assert visit.count("mjx-container") >= max(formulas, 1), f"{page_path}: maths not typeset"
            assert visit.count("mjx-merror") == 0, f"{page_path}: MathJax could not parse a formula"
        for pattern, name, selector in SCREENSHOT_PAGES:
            if page_path in matching(pattern):
                if selector:
                    assert visit.count(selector), f"{page_path} has no {selector} to show"
                    visit.page.evaluate(
                        "s => { document.querySelector(s).scrollIntoView(); window.scrollBy(0, -100); }",
                        selector,
                    )
                    visit.page.wait_for_timeout(200)
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                visit.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    finally:
        visit.page.close()


def test_the_pages_that_need_figures_and_maths_exist() -> None:
    if not PAGES:
        pytest.skip(WHY_NOT_BUILT)
    for pattern in [*MUST_HAVE_FIGURES, *MUST_HAVE_MATHS, *(p for p, _, _ in SCREENSHOT_PAGES)]:
        assert matching(pattern), f"no page of the built book matches {pattern}"
    assert (HTML / "_static" / "plotly.min.js").is_file()
    assert (HTML / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_every_api_page_documents_its_module() -> None:
    """autodoc leaves a page empty, with only a warning in the build log, when its module fails to import
    (l4lab.kernels did, when another module had imported triton before it)."""
    if not PAGES:
        pytest.skip(WHY_NOT_BUILT)
    sources = sorted(p.stem for p in (BOOK / "api").glob("l4lab.*.md"))
    assert sources
    for module in sources:
        page = (HTML / "api" / f"{module}.html").read_text(encoding="utf-8")
        assert f'id="{module}.' in page, f"api/{module}.html documents nothing of {module}"


REMOTE = re.compile(
    r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//[^\"']*[\"']|@import\s+url\([\"']?(?:https?:)?//",
    re.IGNORECASE,
)


def test_no_page_references_a_remote_script_style_or_font() -> None:
    """Static companion of the browser test: also catches what a page would only load on demand."""
    if not PAGES:
        pytest.skip(WHY_NOT_BUILT)
    offenders = {}
    for page in PAGES:
        found = REMOTE.findall((HTML / page).read_text(encoding="utf-8"))
        if found:
            offenders[page] = found[:3]
    for css in (HTML / "_static").rglob("*.css"):
        found = re.findall(
            r"url\([\"']?(?:https?:)?//[^)]*\)", css.read_text(encoding="utf-8", errors="replace")
        )
        if found:
            offenders[css.relative_to(HTML).as_posix()] = found[:3]
    assert offenders == {}
