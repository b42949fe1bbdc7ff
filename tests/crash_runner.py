"""Run ``llmeraser`` commands in forked children and SIGKILL them at chosen points (used by
``test_crash_safety.py``; not a test itself).

    python crash_runner.py JOBS.json RESULTS.json

The parent imports the library once (no computation, so forking is safe) and forks one child per job;
each child runs ``llmeraser.cli.main(argv)``. A job is killed with SIGKILL either

- ``{"kill_after_s": t}``: by the parent, t seconds after the fork (a random point of the run), or
- ``{"kill_at_event": k, "watch": DIR}``: by the child itself just before its k-th file-system operation
  under DIR (an audit-hook event: open, mkdir, rename/replace, remove, rmtree), i.e. at a chosen point of
  the writing of the outputs.

``{"record_events": FILE, "watch": DIR}`` runs to completion and writes the list of watched events;
``{"copy_from": DIR0, "watch": DIR}`` first copies DIR0 (what an earlier job left) to DIR.
Results: one object per job with ``exit_code`` or ``signal`` and the wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time

WATCHED = {"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.unlink"}


def _watch(directory: str, kill_at: int | None, record: list[str] | None) -> None:
    prefix = os.path.realpath(directory)
    count = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal count
        if event not in WATCHED or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if not isinstance(path, (str, os.PathLike)):
            return
        path = os.path.abspath(os.fspath(path))
        if not path.startswith(prefix):
            return
        count += 1
        if record is not None:
            mode = args[1] if event == "open" and len(args) > 1 else ""
            record.append(f"{event} {os.path.relpath(path, prefix)} {mode}".strip())
        if kill_at is not None and count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def _child(job: dict) -> int:
    from llmeraser.cli import main

    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    record: list[str] | None = [] if job.get("record_events") else None
    if "watch" in job:
        _watch(job["watch"], job.get("kill_at_event"), record)
    code = main(job["argv"])
    if record is not None:
        with open(job["record_events"], "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def run_job(job: dict) -> dict:
    if "copy_from" in job:  # start from what an earlier (killed) job left behind
        shutil.copytree(job["copy_from"], job["watch"], symlinks=True)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            code = _child(job)
        except BaseException:  # noqa: BLE001 - report anything as a failure exit
            import traceback

            traceback.print_exc()
            code = 99
        os._exit(code)
    if "kill_after_s" in job:
        deadline = start + job["kill_after_s"]
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return _result(job, status, start)
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return _result(job, status, start)


def _result(job: dict, status: int, start: float) -> dict:
    result = {"name": job["name"], "wall_s": time.monotonic() - start}
    if os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
    else:
        result["exit_code"] = os.WEXITSTATUS(status)
    return result


def main() -> None:
    jobs_path, results_path = sys.argv[1], sys.argv[2]
    with open(jobs_path, encoding="utf-8") as handle:
        jobs = json.load(handle)
    # import everything the commands need before forking (imports only: no threads are started)
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import llmeraser.cli  # noqa: F401
    import llmeraser.eraser  # noqa: F401
    import llmeraser.lifecycle  # noqa: F401
    import llmeraser.lineage  # noqa: F401
    import llmeraser.provenance  # noqa: F401
    import llmeraser.train  # noqa: F401
    import llmeraser.validate  # noqa: F401

    with contextlib.suppress(ImportError):  # else imported by every child's first forward-mode product (~0.7 s)
        import torch._decomp.decompositions_for_jvp  # noqa: F401

    results = [run_job(job) for job in jobs]
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
