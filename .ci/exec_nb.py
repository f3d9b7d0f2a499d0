"""Execute notebooks (copies; the repository's files are never written) and report wall time.

    python .ci/exec_nb.py chapters/01_foundations/ddpm.ipynb [more.ipynb ...]

Runs as the book build does: DIFFNOTES_STATIC=1 (explorers render their static twins),
HF_HUB_OFFLINE=1, TQDM_DISABLE=1, working directory = the notebook's folder. Exits non-zero if
any notebook raises.
"""
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

os.environ.update(DIFFNOTES_STATIC="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
failed = 0
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
        status = "ok"
    except Exception as e:  # report and go on
        status = f"FAILED: {type(e).__name__}: {str(e)[-3000:]}"
        failed += 1
    print(f"{time.perf_counter() - t0:7.1f} s  {path}  {status}", flush=True)
sys.exit(1 if failed else 0)
