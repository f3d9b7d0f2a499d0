"""Sphinx extension loaded by the book build (``_config.yml`` → ``local_extensions``).

It sets ``DIFFNOTES_STATIC=1`` in the build's environment *before* any chapter is executed;
the kernels that MyST-NB starts inherit it, so every explorer renders its static twin
(self-contained HTML and JavaScript) instead of live ipywidgets, which need a kernel.
"""
import os

os.environ["DIFFNOTES_STATIC"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def setup(app):
    # The Colab install cell of every chapter is written from _config.yml (diffnotes.book).
    from diffnotes.book import sync_install_cells, write_equation_index
    for path in sync_install_cells():
        print(f"[diffnotes] rewrote the Colab install cell of {path}")
    write_equation_index()            # book/equations.md, "Equations and code"
    import benchmarks_page            # the {benchmarks} directive of book/results.md
    benchmarks_page.setup(app)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
