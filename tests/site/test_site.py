"""The built website, opened page by page in a real browser (Chromium driven by Playwright).

The site in ``_build/html`` (or ``$DIFFNOTES_SITE``) is served on 127.0.0.1 by a thread running
``http.server``; every request to another origin is refused, so the test proves the site works
with no network. For EVERY page it checks:

* no failed request: no ``requestfailed`` event, no same-origin response with status >= 400,
  and no request leaving 127.0.0.1 (a CDN the offline site would miss);
* no JavaScript error: no ``pageerror`` event and no ``console.error`` message;
* every formula rendered: each Sphinx math element (``.math``) holds a MathJax ``mjx-container``,
  none is a MathJax error (``mjx-merror``), and no raw ``\\(``, ``\\[``, ``$$`` or ``$\\cmd ...$``
  is left in the visible text outside code;
* every static twin (``.diffnotes-explorer``, written by ``diffnotes/widgets/_core.py``): moving
  each of its sliders changes the picture shown (the ``<img>``'s ``src``) and the value label;
* internal links resolve: every same-origin ``href`` names an existing file, and its
  ``#fragment`` is an ``id`` (or ``name``) on the target page.

It skips (with the reason) when the site or the browser is missing, so ``make test`` passes on a
machine without them; ``make site-test`` sets ``DIFFNOTES_SITE_TEST=required`` and then the same
absence is a failure. The browser is Debian's ``chromium`` (``$DIFFNOTES_CHROMIUM`` overrides the
path), never one downloaded by ``playwright install``. A summary of the figures is printed.
"""
from __future__ import annotations

import functools
import html
import http.server
import os
import re
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("DIFFNOTES_SITE", ROOT / "_build" / "html"))
REQUIRED = os.environ.get("DIFFNOTES_SITE_TEST", "") == "required"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads", "_panels_static"}
PAGE_TIMEOUT_MS = 60_000
MAX_COMBOS = 400        # settings of a twin's other sliders tried per control
REFRESH = re.compile(r'<meta[^>]+http-equiv="refresh"[^>]+content="\d+;\s*url=([^"]+)"', re.I)


def _chromium() -> str | None:
    path = os.environ.get("DIFFNOTES_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if Path(path).is_file() and os.access(path, os.X_OK) else None


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"site test required (make site-test) but {reason}", pytrace=False)
    pytest.skip(reason)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on the test's output
        pass


def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html")
                  if not (set(p.relative_to(site).parts[:-1]) & SKIP_DIRS))


# In-page scripts ------------------------------------------------------------------------------
WAIT_MATHJAX = """async () => {
  const M = window.MathJax;
  if (!M || !M.startup || !M.startup.promise) return false;
  await M.startup.promise;
  return true;
}"""

MATH_REPORT = """() => {
  const els = Array.from(document.querySelectorAll('.math'));
  const missing = els.filter(e => !e.querySelector('mjx-container'))
                     .map(e => e.textContent.trim().slice(0, 80));
  const errors = Array.from(document.querySelectorAll('mjx-merror'))
                     .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 80));
  const skip = 'PRE,CODE,SCRIPT,STYLE,TEXTAREA,MJX-CONTAINER,MJX-ASSISTIVE-MML,NOSCRIPT';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode(n) {
    for (let p = n.parentElement; p; p = p.parentElement) {
      if (skip.split(',').includes(p.tagName) || p.classList.contains('highlight'))
        return NodeFilter.FILTER_REJECT;
    }
    return NodeFilter.FILTER_ACCEPT;
  }});
  let text = '';
  for (let n; (n = walker.nextNode());) text += n.textContent + ' ';
  return {math: els.length, containers: document.querySelectorAll('mjx-container').length,
          missing, errors, text};
}"""

PAGE_FACTS = """() => ({
  ids: Array.from(document.querySelectorAll('[id],a[name]'))
            .map(e => e.id || e.getAttribute('name')),
  hrefs: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  twins: document.querySelectorAll('.diffnotes-explorer').length,
})"""

# For twin `t`, slider `j`: with the other sliders at each of their settings in turn (all at 0
# first), move slider j through its values until the picture (the <img>'s src) differs from the
# one at value 0; then put every slider back to 0. A control may legitimately do nothing at some
# settings of the others (a class label at guidance scale 0, a noise level at coupling 0), but
# one that changes the picture at none of them is broken.
EXERCISE_SLIDER = """([t, j, maxCombos]) => {
  const root = document.querySelectorAll('.diffnotes-explorer')[t];
  const img = root.querySelector('img');
  const S = Array.from(root.querySelectorAll('input[type=range]'));
  const s = S[j];
  const label = root.querySelector('[data-v="' + s.dataset.k + '"]');
  const set = (el, v) => { el.value = String(v);
                           el.dispatchEvent(new Event('input', {bubbles: true})); };
  const others = S.filter((_, i) => i !== j);
  const idx = others.map(() => 0);
  let changed = false, labelChanged = false, combos = 0, at = null;
  while (!changed && combos < maxCombos) {
    others.forEach((o, i) => set(o, idx[i]));
    set(s, 0);
    const src0 = img.src, label0 = label ? label.textContent : null;
    for (let v = 1; v <= +s.max && !changed; v++) {
      set(s, v);
      changed = img.src !== src0 && img.src.startsWith('data:image/');
      labelChanged = labelChanged || (label !== null && label.textContent !== label0);
    }
    combos++;
    if (changed) at = idx.slice();
    let i = 0;                                  // next setting of the others (odometer)
    while (i < others.length && ++idx[i] > +others[i].max) { idx[i] = 0; i++; }
    if (i === others.length) break;
  }
  S.forEach(el => set(el, 0));
  const name = (s.parentElement.querySelector('label') || {}).textContent || ('slider ' + j);
  return {name, values: +s.max + 1, combos, changed, labelChanged, othersAt: at};
}"""

TWIN_SHAPE = """(t) => document.querySelectorAll('.diffnotes-explorer')[t]
                       .querySelectorAll('input[type=range]').length"""

RAW_TEX = [(r"\(", re.compile(r"\\\(")), (r"\[", re.compile(r"\\\[")), ("$$", re.compile(r"\$\$")),
           ("$\\cmd...$", re.compile(r"\$[^$\n]{0,200}\\[A-Za-z]+[^$\n]{0,200}\$"))]


# The crawl: one browser, every page, all figures collected once for the tests below ----------
@pytest.fixture(scope="module")
def crawl():
    if not (SITE / "index.html").is_file():
        _unavailable(f"no built site at {SITE} (run `make book` first)")
    chromium = _chromium()
    if chromium is None:
        _unavailable("no Chromium found (Debian: `apt-get install chromium`; or set "
                     "DIFFNOTES_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the `playwright` Python package is not installed (pip install -e '.[site]')")

    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    pages = _pages(SITE)
    R = dict(origin=origin, pages=[p.relative_to(SITE).as_posix() for p in pages],
             requests=0, failed=[], page_errors=[], console_errors=[], external=[],
             math_pages=0, formulas=0, containers=0, math_missing=[], math_errors=[], raw_tex=[],
             twins=0, controls=0, controls_changed=0, twin_failures=[],
             ids={}, hrefs=defaultdict(set), redirects=0, seconds=0.0)
    t0 = time.time()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=CHROMIUM_ARGS)

            def route(r):
                if r.request.url.startswith((origin + "/", "data:", "blob:")):
                    r.continue_()
                else:
                    R["external"].append((current[0], r.request.url))
                    r.abort()
            current = [""]
            for path, rel in zip(pages, R["pages"]):
                # a fresh context per page: each page must work as the reader's first page
                # (empty localStorage, cold cache)
                current[0] = rel
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.route("**/*", route)
                page = context.new_page()
                page.on("request", lambda req: req.url.startswith(("data:", "blob:"))
                        or R.__setitem__("requests", R["requests"] + 1))
                page.on("requestfailed", lambda req, rel=rel: R["failed"].append(
                    (rel, req.url[:200], req.failure or "failed")))
                page.on("response", lambda resp, rel=rel: resp.status >= 400
                        and resp.url.startswith(origin) and R["failed"].append(
                            (rel, resp.url[:200], f"HTTP {resp.status}")))
                page.on("pageerror", lambda err, rel=rel: R["page_errors"].append(
                    (rel, str(err)[:300])))
                page.on("console", lambda msg, rel=rel: msg.type == "error"
                        and R["console_errors"].append((rel, msg.text[:300])))
                refresh = REFRESH.search(path.read_text(errors="replace"))
                page.goto(f"{origin}/{rel}", wait_until="load", timeout=PAGE_TIMEOUT_MS)
                if refresh:                     # a redirect page (index.html → the root page)
                    target = urljoin(f"{origin}/{rel}", html.unescape(refresh.group(1)))
                    R["hrefs"][target].add(rel)
                    R["redirects"] += 1
                    page.wait_for_url(target, wait_until="load", timeout=PAGE_TIMEOUT_MS)
                    context.close()             # the target is checked as a page of its own
                    continue
                page.evaluate(WAIT_MATHJAX)
                page.wait_for_load_state("networkidle", timeout=PAGE_TIMEOUT_MS)

                m = page.evaluate(MATH_REPORT)
                if m["math"]:
                    R["math_pages"] += 1
                R["formulas"] += m["math"]
                R["containers"] += m["containers"]
                R["math_missing"] += [(rel, x) for x in m["missing"]]
                R["math_errors"] += [(rel, x) for x in m["errors"]]
                for what, rx in RAW_TEX:
                    for hit in rx.finditer(m["text"]):
                        a = max(hit.start() - 40, 0)
                        R["raw_tex"].append((rel, what, m["text"][a:hit.end() + 40]))

                facts = page.evaluate(PAGE_FACTS)
                R["ids"][rel] = set(facts["ids"])
                for h in facts["hrefs"]:
                    R["hrefs"][h].add(rel)
                for t in range(facts["twins"]):
                    R["twins"] += 1
                    for j in range(page.evaluate(TWIN_SHAPE, t)):
                        res = page.evaluate(EXERCISE_SLIDER, [t, j, MAX_COMBOS])
                        R["controls"] += 1
                        ok = res["changed"] and res["labelChanged"]
                        R["controls_changed"] += bool(res["changed"])
                        if not ok:
                            R["twin_failures"].append((rel, t, res))
                context.close()
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    R["seconds"] = time.time() - t0
    R["links"], R["bad_links"] = _check_links(R, origin)
    _print_summary(R)
    return R


def _check_links(R, origin):
    """Every same-origin href → an existing file; its #fragment → an id on that page."""
    checked, bad = 0, []
    file_ids: dict[str, set] = {}
    for href, sources in sorted(R["hrefs"].items()):
        if not href.startswith(origin + "/"):
            continue                                    # external: not fetched offline
        checked += 1
        url, frag = urldefrag(href)
        rel = unquote(urlsplit(url).path).lstrip("/")
        target = SITE / rel
        if target.is_dir():
            target, rel = target / "index.html", (rel.rstrip("/") + "/index.html").lstrip("/")
        src = sorted(sources)[0]
        if not target.is_file():
            bad.append((src, href, "no such file"))
            continue
        frag = unquote(frag)
        if not frag or target.suffix != ".html":
            continue
        ids = R["ids"].get(rel)
        if ids is None:                                  # a page outside the crawl
            ids = file_ids.setdefault(rel, set(re.findall(r'\b(?:id|name)="([^"]+)"',
                                                          target.read_text(errors="replace"))))
        if frag not in ids:
            bad.append((src, href, f"no #{frag} on {rel}"))
    return checked, bad


def _print_summary(R):
    lines = [
        f"site test over {SITE} ({R['seconds']:.0f} s):",
        f"  pages                    {len(R['pages'])} ({R['redirects']} redirect)",
        f"  requests                 {R['requests']}",
        f"  failed requests          {len(R['failed'])}",
        f"  requests off 127.0.0.1   {len(R['external'])}",
        f"  page errors              {len(R['page_errors'])}",
        f"  console errors           {len(R['console_errors'])}",
        f"  formulas rendered        {R['formulas'] - len(R['math_missing'])}/{R['formulas']} "
        f"on {R['math_pages']} pages ({R['containers']} mjx-container, "
        f"{len(R['math_errors'])} MathJax errors, {len(R['raw_tex'])} raw TeX left)",
        f"  static twins             {R['twins']}",
        f"  twin controls changed    {R['controls_changed']}/{R['controls']}",
        f"  internal links checked   {R['links']} ({len(R['bad_links'])} broken)",
    ]
    print("\n" + "\n".join(lines))


def _fmt(items, n=25):
    items = list(items)
    more = f"\n  ... and {len(items) - n} more" if len(items) > n else ""
    return "\n".join(f"  {x}" for x in items[:n]) + more


# The checks -----------------------------------------------------------------------------------
def test_every_page_loaded(crawl):
    assert crawl["pages"], f"no HTML pages under {SITE}"
    assert "index.html" in crawl["pages"]


def test_no_failed_request(crawl):
    assert not crawl["failed"], "failed requests (page, url, why):\n" + _fmt(crawl["failed"])
    assert not crawl["external"], ("requests that leave the site (it must work offline):\n"
                                   + _fmt(crawl["external"]))


def test_no_javascript_error(crawl):
    assert not crawl["page_errors"], "page errors:\n" + _fmt(crawl["page_errors"])
    assert not crawl["console_errors"], "console errors:\n" + _fmt(crawl["console_errors"])


def test_every_formula_rendered(crawl):
    assert crawl["formulas"] > 0, "no formula on any page: is math rendered at all?"
    assert not crawl["math_missing"], ("math elements with no MathJax output (page, TeX):\n"
                                       + _fmt(crawl["math_missing"]))
    assert not crawl["math_errors"], "MathJax errors (page, message):\n" + _fmt(crawl["math_errors"])
    assert not crawl["raw_tex"], "raw TeX in the visible text (page, kind, context):\n" + _fmt(
        crawl["raw_tex"])


def test_every_twin_control_changes_the_picture(crawl):
    assert not crawl["twin_failures"], (
        "static-twin sliders that do not change the picture (page, twin #, result):\n"
        + _fmt(crawl["twin_failures"]))


def test_internal_links_resolve(crawl):
    assert crawl["links"] > 0
    assert not crawl["bad_links"], "broken internal links (page, href, why):\n" + _fmt(
        crawl["bad_links"])
