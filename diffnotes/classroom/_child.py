"""The sandboxed grading process: one exercise of one submission (run by diffnotes.classroom.sandbox).

It limits itself (memory, CPU time, file size; the grader started it as ``nobody`` when it could) before any submission code
runs, executes the chapter's setup cell and the submission's exercise cell, and writes only the
function's outputs on the checker's inputs, as JSON lines, for the clean grader to compare. Nothing
it writes is trusted: a forged line is just an output, and a verdict it might write is ignored.
"""
import json
import os
import resource
import sys


def _limit(spec):
    mem = int(spec["memory_mb"]) * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = int(spec["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    fsize = int(spec["fsize_mb"]) * 2 ** 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main(jobdir):
    with open(os.path.join(jobdir, "job.json")) as f:
        spec = json.load(f)
    _limit(spec)
    out_dir = os.path.join(jobdir, "out")
    os.chdir(os.path.join(jobdir, "work"))
    log = open(os.path.join(out_dir, "stdout.txt"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    note = os.path.join(out_dir, "note.txt")
    if spec["engine"] == "otter":
        return _otter(spec, jobdir, out_dir, note)
    import importlib
    from diffnotes.exercises import record        # bound before the submission runs
    importlib.import_module(spec["checker_module"])  # registers the checker (only that module)
    ns = {"__name__": "__main__"}
    for label, src in (("the setup cell", spec["setup"]), ("definitions borrowed from other "
                       "exercise cells", spec["borrow"]), ("the exercise cell", spec["cell"])):
        try:
            exec(compile(src, f"<{label}>", "exec"), ns)
        except BaseException as e:                 # noqa: BLE001  (SystemExit included)
            with open(note, "a") as f:
                f.write(f"{label} raised {type(e).__name__}: {str(e)[:300]}\n")
    fn = ns.get(spec["function"])
    if not callable(fn):
        with open(note, "a") as f:
            f.write(f"the exercise cell does not define a function {spec['function']}\n")
        return
    with open(os.path.join(out_dir, spec["question"] + ".jsonl"), "w") as sink:
        record(spec["checker"], fn, cases=spec["cases"], seed=spec["seed"], sink=sink)


def _otter(spec, jobdir, out_dir, note):
    """Execute the reduced notebook with ``otter run`` (a Jupyter kernel, otter's test cases);
    the test cases record the outputs (DIFFNOTES_CLASSROOM_RECORD); otter's own score stays here."""
    os.environ["DIFFNOTES_CLASSROOM_RECORD"] = out_dir
    import otter.run
    try:
        otter.run.main(os.path.join(jobdir, "work", "submission.ipynb"),
                       autograder=os.path.join(jobdir, "autograder.zip"),
                       output_dir=os.path.join(jobdir, "work"), no_logo=True)
    except BaseException as e:                     # noqa: BLE001
        with open(note, "a") as f:
            f.write(f"otter run raised {type(e).__name__}: {str(e)[:300]}\n")


if __name__ == "__main__":
    main(sys.argv[1])
