"""`atlas submit` and the Ray session without a cluster: which address is used, where the token comes from, which
submission ids count as the same job, and a local Ray started with token authentication (Ray >= 2.61's default)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from repo_paths import REPO_ROOT
from pipeline.cluster.config import parse_config

REPO = REPO_ROOT


def config(name: str = "imagenet-resnet50", out: str = "s3://b/atlas"):
    return parse_config(
        {
            "job": {"name": name, "out": out},
            "model": {"spec": "torchvision:resnet50"},
            "data": {"source": "s3://b/shard-{0..1}.tar"},
            "render": {"classes": "none"},
        }
    )


def test_address_flag_wins_over_ray_address_and_says_so(monkeypatch, caplog):
    """Ray's JobSubmissionClient lets RAY_ADDRESS (set by KubeRay in every Ray pod) override its argument."""
    from pipeline.cluster.submit import connect, resolve_address

    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert resolve_address("http://head:8265") == "http://head:8265"
    assert "RAY_ADDRESS=http://elsewhere:8265 is ignored" in caplog.text
    assert resolve_address(None) == "http://elsewhere:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match="pass --address"):
        resolve_address(None)
    # The client really talks to --address (Ray's own resolution would have picked RAY_ADDRESS): nothing listens on
    # port 9 of 127.0.0.1, so the error names it.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.2:8265")
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        connect("http://127.0.0.1:9")
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.2:8265", "the variable is restored"


def test_token_is_found_where_ray_looks(monkeypatch, tmp_path):
    from pipeline.ray_session import auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="does not exist"):
        auth_token()


def test_same_job_matches_every_date_and_retry_but_no_other_job():
    from pipeline.cluster.submit import same_job, submission_id

    a = config()
    pattern = same_job(a)
    other_config = config(out="s3://b/other")
    for job_id in (
        submission_id(a, "2026-12-01"),
        submission_id(a, "2027-01-31") + "-retry3",
        submission_id(other_config, "2026-12-01"),
    ):
        assert pattern.fullmatch(job_id), job_id
    longer = submission_id(config(name="imagenet-resnet50-2"), "2026-12-01")
    assert not pattern.fullmatch(longer), "a job whose name starts with this one's is another job"
    assert not pattern.fullmatch("raysubmit_abc")


def test_local_ray_session_runs_with_token_authentication(tmp_path):
    """Without RAY_AUTH_MODE, the local Ray that `atlas` starts runs in token mode (what Ray >= 2.61 does by
    default), with a token made for the process and written nowhere; Ray's own view of the mode is checked."""
    code = textwrap.dedent("""
        import os, ray
        from pipeline.ray_session import ray_session
        with ray_session(num_cpus=1) as shape:
            from ray._raylet import AuthenticationMode, get_authentication_mode
            assert get_authentication_mode() == AuthenticationMode.TOKEN, get_authentication_mode()

            @ray.remote
            def mode():
                return os.environ.get("RAY_AUTH_MODE"), len(os.environ.get("RAY_AUTH_TOKEN", ""))

            print("RESULT", shape.cpus, *ray.get(mode.remote()))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=REPO, RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT 1 token 64" in done.stdout
    assert not (tmp_path / ".ray").exists(), "no token file written into the user's home"


def test_submit_gives_up_with_one_line_when_its_job_disappears(monkeypatch, capsys):
    """Issue 24, Why 8: a standing head restarted without GCS fault tolerance forgets its jobs; the Jobs API then
    answers 404 ("does not exist") for the id `atlas submit` follows. It must fail with one line after a bounded
    wait, not poll forever. The fake client answers as Ray's JobSubmissionClient does for an unknown id."""
    import threading

    import pipeline.cluster.submit as submit
    from pipeline.cli import main

    class VanishingJobs:
        def __init__(self):
            self.submitted, self.status_calls = [], 0

        def list_jobs(self):
            return []

        def submit_job(self, submission_id, **kwargs):
            self.submitted.append(submission_id)
            return submission_id

        def get_job_status(self, job_id):
            self.status_calls += 1
            if self.submitted and self.status_calls > 2:  # running for a moment, then the head forgot it
                raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
            return "RUNNING"

        async def tail_job_logs(self, job_id):
            raise RuntimeError("the log stream broke")
            yield ""  # an async generator, as Ray's is

    fake = VanishingJobs()
    monkeypatch.setattr(submit, "connect", lambda address: fake)
    monkeypatch.setattr(submit, "VANISHED_SECONDS", 1.5)
    monkeypatch.setattr(submit, "auth_token", lambda: None)
    path = os.path.join(REPO, "jobs", "demo.toml")
    result = []
    thread = threading.Thread(
        target=lambda: result.append(main(["submit", path, "--address", "http://head:8265", "--date", "2026-12-01"])),
        daemon=True,
    )
    t0 = time.time()
    thread.start()
    thread.join(timeout=60)
    assert result == [2], "atlas submit kept waiting for a job the cluster no longer knows"
    assert time.time() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disappeared from http://head:8265" in err[-1] and fake.submitted[0] in err[-1], err
