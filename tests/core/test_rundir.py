"""What the tool promises about a run directory (docs/usage.md, "What the tool promises about a run directory"), tried as a hostile but fair user
would: a folder of their own files as --out, a failing --overwrite, the umask, two scans at once, a killed or
interrupted scan (which resumes), and user errors that must read as one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from repo_paths import SUPPORT_DIR
from pipeline.cli import main
from pipeline.models import ModelConfig
from pipeline.ray_session import reap_orphans
from pipeline.rundir import RunBusy, claim, recover, run_lock
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.store import MANIFEST, MARKER, PREVIOUS, STAGING, RunError, connect, read_manifest

SMALL = ModelConfig(spec="module:tiny_models:small_net", image_size=32)


def tree(path: str) -> dict[str, str]:
    """Every file under `path` (relative name -> sha1 of its bytes)."""
    out = {}
    for directory, _, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            with open(full, "rb") as handle:
                out[os.path.relpath(full, path)] = hashlib.sha1(handle.read()).hexdigest()
    return out


def scan_args(data: str, out: str, *extra: str) -> list[str]:
    return [
        "scan",
        "--model",
        SMALL.spec,
        "--image-size",
        "32",
        "--data",
        data,
        "--out",
        out,
        "--layers",
        "down",
        "--k",
        "3",
        "--batch-size",
        "4",
        "-q",
        *extra,
    ]


def test_a_folder_of_user_files_is_refused_and_untouched(photo_folder, tmp_path, capsys):
    """Issue 11 case 1: entries named like the tool's tables used to be taken for an unfinished run and cleared."""
    folder = tmp_path / "P"
    (folder / "images").mkdir(parents=True)
    (folder / "site").mkdir()
    (folder / "site" / "index.html").write_text("hi")
    for name in sorted(os.listdir(os.path.join(photo_folder, "chelsea")))[:3]:
        (folder / "images" / name).write_bytes(open(os.path.join(photo_folder, "chelsea", name), "rb").read())
    before = tree(str(folder))
    assert main(scan_args(str(folder), str(folder))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and is not a run directory" in err and "Traceback" not in err
    assert tree(str(folder)) == before and sorted(os.listdir(folder)) == ["images", "site"]


def test_claim_marks_new_and_empty_folders_only(tmp_path):
    assert claim(str(tmp_path / "new")) == str(tmp_path / "new") and (tmp_path / "new" / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    claim(str(tmp_path / "empty"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a run directory.*notes.txt"):
        claim(str(tmp_path / "user"))
    assert os.listdir(tmp_path / "user") == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="not a directory"):
        claim(str(tmp_path / "file"))
    with pytest.raises(RunError, match="cannot write the run directory"):
        claim("/proc/atlas-cannot-be-here/run")


def test_interrupted_swaps_roll_forward_or_back(tmp_path):
    """The swap journal: a crash after the staged manifest was written finishes the new run; a crash before it
    restores the old one; a finished swap only needs its leftovers removed."""
    run = tmp_path / "run"
    claim(str(run))
    # Crash mid-swap, staged manifest present: the new run is completed.
    (run / PREVIOUS / "topk").mkdir(parents=True)
    (run / PREVIOUS / MANIFEST).write_text('{"fingerprint": "old"}')
    (run / STAGING / "units").mkdir(parents=True)
    (run / STAGING / MANIFEST).write_text('{"fingerprint": "new"}')
    (run / "topk").mkdir()  # already moved in before the crash
    recover(str(run))
    assert read_manifest(str(run))["fingerprint"] == "new" and (run / "units").is_dir()
    assert not (run / PREVIOUS).exists() and not (run / STAGING).exists()
    # Crash with no staged manifest: the old run comes back.
    os.rename(run / MANIFEST, tmp_path / "m")
    (run / PREVIOUS).mkdir()
    os.rename(tmp_path / "m", run / PREVIOUS / MANIFEST)
    recover(str(run))
    assert read_manifest(str(run))["fingerprint"] == "new" and not (run / PREVIOUS).exists()


def test_failed_overwrite_keeps_the_previous_run_and_files_follow_the_umask(photo_folder, tmp_path, capsys):
    """Issue 11 cases 2 and 3. The scans run in this process (`--executor local`): the run directory's promises
    are the same on either executor (the run lock, the staging swap), and a killed scan on Ray is tried below."""
    run = str(tmp_path / "run")
    old_mask = os.umask(0o027)
    try:
        assert main(scan_args(photo_folder, run, "--executor", "local")) == 0
    finally:
        os.umask(old_mask)
    for name in (MANIFEST, "units/part-0.parquet", "images/part-0.parquet", "topk/layer=down/part-0.parquet"):
        assert os.stat(os.path.join(run, name)).st_mode & 0o777 == 0o640, name
    os.makedirs(os.path.join(run, "atlas"))
    with open(os.path.join(run, "atlas", "index.parquet"), "wb") as handle:
        handle.write(b"stand-in for a rendered atlas")
    os.makedirs(os.path.join(run, "site"))
    with open(os.path.join(run, "site", "index.html"), "w") as handle:
        handle.write("<p>site</p>")
    with open(os.path.join(run, "notes.txt"), "w") as handle:  # the user's own file beside the run
        handle.write("mine")
    before = tree(run)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(scan_args(str(bad), run, "--overwrite", "--executor", "local")) == 2
    assert "could be decoded" in capsys.readouterr().err
    after = tree(run)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == {
        k: v for k, v in before.items() if not k.startswith(".")
    }
    # An --overwrite that succeeds replaces the tables and removes what was made from the old scan, nothing else.
    assert main(scan_args(photo_folder, run, "--overwrite", "--k", "2", "--executor", "local")) == 0
    assert read_manifest(run)["k"] == 2 and not os.path.exists(os.path.join(run, "atlas"))
    assert open(os.path.join(run, "notes.txt")).read() == "mine"
    assert not os.path.exists(os.path.join(run, PREVIOUS)) and not os.path.exists(os.path.join(run, STAGING))


def _subprocess_env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([SUPPORT_DIR, os.environ.get("PYTHONPATH", "")]),
        RAY_AUTH_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )


def _session_processes(sid: int) -> list[int]:
    """Live processes in the process session `sid` (the scan subprocess and the local Ray it started)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                found.append(int(entry))
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
        with open(f"/proc/{pid}/environ", "rb") as handle:
            owner = [v.decode() for v in handle.read().split(b"\0") if v.startswith(b"NEURON_ATLAS_LOCAL_RAY=")]
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return f"{pid} {state} {command} {owner}"
    except OSError:
        return "?"


def _wait(condition, seconds: float, what) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what() if callable(what) else what}")


def _flushes(run: str) -> int:
    root = os.path.join(run, STAGING, "flushes")
    return len([n for n in os.listdir(root) if not n.startswith(".")]) if os.path.isdir(root) else 0


@pytest.mark.ray  # each scan command below starts a local Ray of its own
@pytest.mark.slow
def test_killed_scan_is_locked_while_alive_then_resumes_exactly(photo_folder, tmp_path, capsys):
    """Issue 13: a scan killed (SIGKILL) midway resumes from its committed flushes and ends identical to an
    undisturbed run; a second scan refuses while the first lives (naming it), takes the lock once it is dead.
    Issue 11: Ctrl-C (SIGINT) stops a scan with one line, status 130, and leaves no Ray process behind.

    Both scan commands run on a local Ray of their own (a small folder would otherwise run in-process: the kill
    must orphan a Ray's helpers) and start together, so their Rays start side by side. Neither can finish: the
    tiny model holds its forward passes once the run has N durable flushes (an environment hook read by
    tiny_models), so each signal lands mid-scan however slow the machine, and no time goes into a slowed model.
    """
    reference = str(tmp_path / "reference")  # the undisturbed run: in this process (its subject is not Ray)
    assert main(scan_args(photo_folder, reference, "--flush-images", "4", "--executor", "local")) == 0
    run, interrupted = str(tmp_path / "run"), str(tmp_path / "interrupted")
    ray_args = ("--flush-images", "4", "--actors", "1", "--executor", "ray")

    def start(out: str, hold_at: int) -> subprocess.Popen:
        args = [sys.executable, "-m", "pipeline", *scan_args(photo_folder, out, *ray_args)]
        env = dict(_subprocess_env(), ATLAS_TEST_HOLD_WHEN_FLUSHED=f"{hold_at}:{os.path.join(out, STAGING, 'flushes')}")
        # stderr to a file, not a pipe: a held command's log must not fill a pipe nobody reads yet.
        with open(f"{out}.stderr", "wb") as log:
            return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    first = start(run, 2)  # killed once two flushes are durable
    third = start(interrupted, 1)  # interrupted once one flush is durable
    try:
        try:
            _wait(lambda: _flushes(run) >= 2, 300, "two committed flushes")
            capsys.readouterr()
            assert main(scan_args(photo_folder, run, "--flush-images", "4")) == 2
            err = capsys.readouterr().err
            assert f"is being written by pid {first.pid}" in err and err.count("\n") == 1
            os.kill(first.pid, signal.SIGKILL)  # the command alone: its local Ray's helpers are orphaned
            first.wait(timeout=30)
            # The next command that starts a local Ray ends what the killed one left, and nothing else: the
            # other scan's Ray, whose command lives, is left alone (checked below: it still answers Ctrl-C).
            _wait(
                lambda: reap_orphans() == 0 and not _session_processes(first.pid),
                120,
                lambda: f"the orphans to be ended: {[_command(p) for p in _session_processes(first.pid)]}",
            )
            assert third.poll() is None and _session_processes(third.pid)
        finally:
            for pid in _session_processes(first.pid):
                os.kill(pid, signal.SIGKILL)
        committed = _flushes(run)
        assert read_manifest(run) is None and committed >= 2
        # Resumed in this process: the flushes a killed Ray scan committed are taken up by the local executor
        # (tests/scan/test_scan_local.py resumes a local scan on Ray).
        manifest = run_scan(
            ScanConfig(
                model=SMALL,
                data=photo_folder,
                out=run,
                layers="down",
                k=3,
                batch_size=4,
                flush_images=4,
                progress=False,
                executor="local",
            )
        )
        with open(os.path.join(reference, MANIFEST)) as handle:
            images = json.load(handle)["counts"]["images"]
        second = manifest["attempts"][-1]
        assert manifest["attempts"][0]["images_committed"] >= 8
        # The resumed attempt processed only what the killed one had not committed.
        assert second["images_processed"] == images - manifest["attempts"][0]["images_committed"]
        ref, got = connect(reference), connect(run)
        for query in (
            "SELECT layer, unit, rank, image_key, act, y, x, box_x0, box_y0, box_x1, box_y1 FROM topk ORDER BY ALL",
            "SELECT layer, unit, count, n_active, max, min, p50, p99, dead FROM units ORDER BY ALL",
            "SELECT * FROM images ORDER BY image_key",
        ):
            assert got.execute(query).fetchall() == ref.execute(query).fetchall(), query
        mean_ref = ref.execute("SELECT mean, std FROM units ORDER BY unit").fetchall()
        mean_got = got.execute("SELECT mean, std FROM units ORDER BY unit").fetchall()
        assert [v for row in mean_got for v in row] == pytest.approx([v for row in mean_ref for v in row], rel=1e-9)

        # Ctrl-C: one line, status 130, how to resume, and no process of its local Ray left behind.
        _wait(lambda: _flushes(interrupted) >= 1, 300, "a committed flush")
        os.kill(third.pid, signal.SIGINT)
        third.wait(timeout=120)
        err = open(f"{interrupted}.stderr").read()
        assert third.returncode == 130, err
        lines = [line for line in err.splitlines() if line.startswith("atlas:")]
        assert lines == ["atlas: interrupted; what was committed is kept: run the same command again to resume"]
        assert "Traceback" not in err
        _wait(lambda: not _session_processes(third.pid), 60, "the interrupted scan's Ray processes to exit")
    finally:
        for process in (first, third):
            if process.poll() is None:
                process.kill()
            for pid in _session_processes(process.pid):
                os.kill(pid, signal.SIGKILL)


def test_lock_is_reentrant_in_one_process_and_names_the_holder(tmp_path):
    run = str(tmp_path / "run")
    claim(run)
    with run_lock(run):
        with run_lock(run):  # `atlas run` holds it and its scan stage takes it again
            pass
        holder = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pipeline.rundir import run_lock\n"
                f"try:\n    run_lock({run!r}).__enter__()\nexcept Exception as e:\n"
                "    print(type(e).__name__, e); sys.exit(3)",
            ],
            capture_output=True,
            text=True,
            env=_subprocess_env(),
        )
        assert holder.returncode == 3 and f"RunBusy {run} is being written by pid {os.getpid()}" in holder.stdout
    with run_lock(run):  # released: taken again
        pass
    assert issubclass(RunBusy, RunError)


def test_user_errors_are_one_line(tmp_path, photo_folder, capsys):
    """Issue 11 case 9: no traceback for a bad --out; --debug shows it. Each refusal is checked for its own
    reason, so three refusals for one wrong reason (a bad model, a missing folder) cannot pass."""
    (tmp_path / "file.txt").write_text("x")
    for out, reason in (
        (str(tmp_path / "file.txt"), f"{tmp_path / 'file.txt'} exists and is not a directory"),
        ("/proc/atlas-cannot-be-here/run", "cannot write the run directory /proc/atlas-cannot-be-here/run: "),
    ):
        assert main(scan_args(photo_folder, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"atlas: error: {reason}") and err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "file.txt").read_text() == "x"
    with pytest.raises(RunError, match="file.txt exists and is not a directory"):
        main(["--debug", *scan_args(photo_folder, str(tmp_path / "file.txt"))])
