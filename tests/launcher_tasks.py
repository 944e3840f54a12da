"""Task bodies for the launcher tests, run by submitit in the jobs' own processes (importable there through
PYTHONPATH). The `transagent` ones wrap the real `run_task` and SIGKILL their own process at a chosen point of the
first attempt, so "killed mid-way" is exact, not a race."""
import json
import os
import signal
from pathlib import Path


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def marker_task(argv):
    """argv = [directory, name, behaviour, ...]: appends this attempt's pid to <name>.attempts, then, unless this
    attempt is killed, writes <name>.done. Behaviours: killed-once (a retry must carry --resume), ok PREREQUISITE
    (records whether PREREQUISITE was done when it started), transagent ARGV... (the real job body)."""
    directory, name, behaviour, rest = Path(argv[0]), argv[1], argv[2], argv[3:]
    attempts = directory / f"{name}.attempts"
    previous = attempts.read_text().split() if attempts.exists() else []
    attempts.write_text(" ".join(previous + [str(os.getpid())]))
    if behaviour == "killed-once" and not previous:
        _kill_self()
    if behaviour == "killed-once" and "--resume" not in rest:
        raise RuntimeError("a retry must run the retry command line")
    done = {}
    if behaviour == "ok" and rest:
        done["prerequisite_done"] = (directory / f"{rest[0]}.done").exists()
    if behaviour == "transagent":
        from pipelines.launch import run_task

        run_task(rest)
        done["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE")
    (directory / f"{name}.done").write_text(json.dumps(done))


def extract_killed_once(argv):
    """The real extraction task; on the first attempt of the agent named by LAUNCH_TEST_KILL, the process is
    SIGKILLed once its second batch is on disk and journaled (some rows of the segment written, not all)."""
    from pipelines.launch import run_task

    import yaml

    agent = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())["agents"]   # the task's one agent
    marker = Path(os.environ["LAUNCH_TEST_MARKERS"]) / f"killed-{agent}"
    if agent == os.environ["LAUNCH_TEST_KILL"] and not marker.exists():
        from extract import runner

        put, batches = runner.BackgroundWriter.put, []

        def put_then_die(self, rows, arrays):
            put(self, rows, arrays)
            batches.append(rows)
            if len(batches) == 2:
                self._queue.put(None)   # let the writer thread finish both batches, then die
                self._thread.join()
                marker.write_text(str(os.getpid()))
                _kill_self()

        runner.BackgroundWriter.put = put_then_die
    run_task(argv)
