"""Sphinx extension loaded by the book build (``_config.yml`` → ``local_extensions``).

It sets ``DIFFNOTES_STATIC=1`` in the build's environment *before* any chapter is executed;
the kernels that MyST-NB starts inherit it, so every explorer renders its static twin
(self-contained HTML and JavaScript) instead of live ipywidgets, which need a kernel.
"""
import os

os.environ["DIFFNOTES_STATIC"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def _one_copy_of_each_script(app, pagename, templatename, context, doctree):
    """Drop repeated ``<script>`` entries from a page, and thebe's when thebe is off.

    Sphinx 7.4 lists an inline script that an extension adds with ``app.add_js_file(None,
    body=...)`` after the builder started twice (once with ``filename=None``, once with
    ``filename=""``, so its own de-duplication misses it). sphinx-thebe's inline script declares
    ``const THEBE_JS_URL``, so the second copy threw "Identifier 'THEBE_JS_URL' has already been
    declared" on every page. With ``launch_buttons: thebe: false`` nothing uses thebe at all,
    so its scripts (one pointing at a CDN) are dropped too.
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    thebe = bool((app.config.html_theme_options.get("launch_buttons") or {}).get("thebe"))
    seen, keep = set(), []
    for js in scripts:
        name = getattr(js, "filename", js) or ""
        attrs = getattr(js, "attributes", {}) or {}
        body = attrs.get("body", "")
        if not thebe and ("sphinx-thebe.js" in name or "THEBE_JS_URL" in body):
            continue
        key = (name, tuple(sorted((k, str(v)) for k, v in attrs.items())))
        if key in seen:
            continue
        seen.add(key)
        keep.append(js)
    context["script_files"] = keep


def setup(app):
    # The Colab install cell of every chapter is written from _config.yml (diffnotes.book).
    from diffnotes.book import sync_install_cells, write_equation_index
    for path in sync_install_cells(app.srcdir):     # the tree being built (also a copy in /tmp)
        print(f"[diffnotes] rewrote the Colab install cell of {path}")
    write_equation_index(app.srcdir)  # book/equations.md, "Equations and code"
    import benchmarks_page            # the {benchmarks} directive of book/results.md
    benchmarks_page.setup(app)
    app.connect("html-page-context", _one_copy_of_each_script, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
