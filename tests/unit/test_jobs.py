"""The Jobs CLI without a cluster: where the Jobs API is, and how jobs are told apart and listed."""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from orchestrator import cli, jobs

pytestmark = pytest.mark.unit


@pytest.fixture
def listening():
    """A TCP port that accepts connections and closes them (a stand-in GCS port: no HTTP)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def serve():
        while True:
            try:
                sock.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)


def _never(address):
    raise AssertionError(f"no driver should connect to {address}")


# -- the address ------------------------------------------------------------------------------


def test_a_dashboard_url_is_used_as_given(no_env, monkeypatch):
    assert jobs.jobs_url("http://head:8300/", ask=_never) == "http://head:8300"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com")
    assert jobs.jobs_url(None, ask=_never) == "https://ray.example.com"


def test_a_gcs_address_asks_the_cluster_for_its_dashboard(no_env, monkeypatch, listening):
    asked = []

    def ask(address):
        asked.append(address)
        return "127.0.0.1:8299"

    assert jobs.jobs_url(f"127.0.0.1:{listening}", ask=ask) == "http://127.0.0.1:8299"
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{listening}")
    assert jobs.jobs_url(None, ask=ask) == "http://127.0.0.1:8299"
    # --address wins over RAY_ADDRESS
    assert jobs.jobs_url(f"ray://127.0.0.1:{listening}", ask=ask) == "http://127.0.0.1:8299"
    assert asked == [f"127.0.0.1:{listening}"] * 2 + [f"ray://127.0.0.1:{listening}"]


def test_a_dashboard_bound_to_every_interface_is_reached_by_the_heads_name(no_env, monkeypatch, listening):
    monkeypatch.setattr(jobs, "_probe", lambda host, port: True)
    monkeypatch.setattr(jobs, "_is_dashboard", lambda host, port: False)
    assert jobs.jobs_url("head.internal:6379", ask=lambda a: "0.0.0.0:8265") == "http://head.internal:8265"
    assert jobs.jobs_url("head.internal:6379", ask=lambda a: "127.0.0.1:8265") == "http://head.internal:8265"
    assert jobs.jobs_url("127.0.0.1:6379", ask=lambda a: "127.0.0.1:8271") == "http://127.0.0.1:8271"


def test_auto_is_the_head_started_on_this_machine(no_env, monkeypatch, listening):
    monkeypatch.setattr(jobs, "local_gcs", lambda: f"127.0.0.1:{listening}")
    assert jobs.jobs_url("auto", ask=lambda a: f"dash-of-{a}:1") == f"http://dash-of-127.0.0.1:{listening}:1"
    monkeypatch.setattr(jobs, "local_gcs", lambda: None)
    with pytest.raises(jobs.JobsError, match="'auto' but no Ray head is running on this machine.*--address"):
        jobs.jobs_url("auto", ask=_never)


def test_no_address_and_no_local_head_says_there_is_no_cluster(no_env, monkeypatch):
    monkeypatch.setattr(jobs, "local_gcs", lambda: None)
    with pytest.raises(jobs.JobsError, match="no Ray cluster.*--address.*RAY_ADDRESS"):
        jobs.jobs_url(None, ask=_never)


def test_an_unreachable_or_unreadable_address_is_an_error_naming_it(no_env):
    with pytest.raises(jobs.JobsError, match=r"nothing answers at the Ray address 127\.0\.0\.1:1 .*--address"):
        jobs.jobs_url("127.0.0.1:1", ask=_never)
    with pytest.raises(jobs.JobsError, match="cannot read 'head' as a Ray address"):
        jobs.jobs_url("head", ask=_never)
    with pytest.raises(jobs.JobsError, match=r"no Ray Jobs API answers at http://127\.0\.0\.1:1 .*--address"):
        jobs.client("http://127.0.0.1:1")


def test_driver_failures_become_one_sentence(no_env, listening):
    def refused(address):
        raise ConnectionError("Authentication failed: UNAUTHENTICATED")

    with pytest.raises(jobs.JobsError, match="requires an auth token: set RAY_AUTH_TOKEN"):
        jobs.jobs_url(f"127.0.0.1:{listening}", ask=refused)

    def broken(address):
        raise ConnectionError("GCS at that port is not a GCS")

    with pytest.raises(jobs.JobsError, match=f"could not connect to the Ray cluster at 127.0.0.1:{listening}"):
        jobs.jobs_url(f"127.0.0.1:{listening}", ask=broken)
    with pytest.raises(jobs.JobsError, match="runs no dashboard.*--include-dashboard=true"):
        jobs.jobs_url(f"127.0.0.1:{listening}", ask=lambda a: "")


class _Dashboard(http.server.BaseHTTPRequestHandler):
    """Answers /api/version like Ray's dashboard, behind a token when ``token`` is set."""

    token: str | None = None

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            code, body = (403, b"Forbidden") if self.headers.get("Authorization") else (401, b"Unauthorized")
        else:
            code, body = 200, json.dumps({"ray_version": "2.60.0", "version": "4"}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def dashboard():
    handler = type("Handler", (_Dashboard,), {"token": "s3cret"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_missing_or_wrong_token_is_one_sentence_naming_the_fix(no_env, monkeypatch, dashboard, tmp_path):
    url = f"http://127.0.0.1:{dashboard}"
    with pytest.raises(jobs.JobsError, match=f"cluster at {url} requires an auth token.*set RAY_AUTH_TOKEN"):
        jobs.client(url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    with pytest.raises(jobs.JobsError, match="refused the auth token .* as invalid"):
        jobs.client(url)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "token").write_text("s3cret\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert jobs.client(url) is not None


def test_a_dashboard_named_without_its_scheme_is_found_without_a_driver(no_env, dashboard):
    assert jobs.jobs_url(f"127.0.0.1:{dashboard}", ask=_never) == f"http://127.0.0.1:{dashboard}"


# -- telling jobs apart -------------------------------------------------------------------------


@pytest.mark.parametrize(("entrypoint", "expected"), [
    ("r1lab run grpo -c configs/demo/grpo.yaml run.name=a1 model.path=/m", ("grpo", "a1")),
    ("cd /src && /venv/bin/r1lab run sft -c x.yaml grpo.steps=3", ("sft", None)),
    ("r1lab run -c x.yaml --verbose pipeline run.name=p", ("pipeline", "p")),
    ("python -m orchestrator.cli run eval --config e.yaml run.name=e && echo done", ("eval", "e")),
    ("r1lab status", None),
    ("python -c 'print(1)'", None),
    ("python train.py run grpo", None),
    ("echo 'unbalanced", None),
])
def test_an_r1lab_run_is_recognised_by_its_entrypoint(entrypoint, expected):
    assert jobs.r1lab_entrypoint(entrypoint) == expected


def test_the_log_names_the_run_and_its_latest_step():
    log = "\n".join([
        "some ray line",
        jobs.header_line("named-in-config", "grpo"),
        "[r1lab] grpo 1/9 reward 0.10",
        "noise [r1lab] grpo 2/9 reward 0.25 kl 0.001",
        "done in 30s",
    ])
    assert jobs.read_log(log) == (("named-in-config", "grpo"), (2, 9, "reward 0.25 kl 0.001"))
    assert jobs.read_log("nothing yet") == (None, None)


def _details(submission_id, entrypoint, status="RUNNING", metadata=None, start=1_700_000_000_000):
    return SimpleNamespace(submission_id=submission_id, job_id="02000000", entrypoint=entrypoint,
                           status=SimpleNamespace(value=status), metadata=metadata or {}, start_time=start)


class FakeClient:
    """The parts of ``JobSubmissionClient`` that listing uses."""

    def __init__(self, details, logs):
        self.details, self.logs, self.read = details, logs, []

    def list_jobs(self):
        return list(reversed(self.details))

    def get_job_logs(self, job_id):
        self.read.append(job_id)
        return self.logs.get(job_id, "")


def _cluster() -> FakeClient:
    return FakeClient(
        [
            _details("r1lab-a-1", "cd /src && /v/bin/r1lab run grpo -c c.yaml run.name=a", "STOPPED",
                     {"r1lab_run": "a", "r1lab_stage": "grpo"}, start=1),
            _details("raysubmit_plain", "python -c 'import time; time.sleep(600)'", "RUNNING", start=2),
            _details("raysubmit_r1", "r1lab run grpo -c configs/demo/grpo.yaml model.path=/m", start=3),
            _details("r1lab-stop-a-2", "python -m orchestrator.control stop a", "SUCCEEDED",
                     {"r1lab_control": "a"}, start=4),
            _details(None, "python my_driver.py", start=5),  # a driver that ran ray.init itself
            _details("r1lab-a-3", "cd /src && /v/bin/r1lab run grpo -c c.yaml run.name=a run.resume=true",
                     "RUNNING", {"r1lab_run": "a", "r1lab_stage": "grpo"}, start=6),
        ],
        {
            "r1lab-a-1": "[r1lab] grpo 3/40 reward 0.1",
            "raysubmit_r1": jobs.header_line("from-config", "grpo") + "\n[r1lab] grpo 5/60 reward 0.3\n",
            "r1lab-a-3": "[r1lab] grpo 7/40 reward 0.2\n",
        },
    )


def test_every_submitted_job_is_listed_and_r1lab_runs_are_named():
    c = _cluster()
    listed = jobs.list_jobs(c)
    assert [(j.job_id, j.run, j.stage, j.status, j.step, j.total, j.submitted_by_r1lab) for j in listed] == [
        ("r1lab-a-1", "a", "grpo", "STOPPED", 3, 40, True),
        ("raysubmit_plain", None, None, "RUNNING", None, None, False),
        ("raysubmit_r1", "from-config", "grpo", "RUNNING", 5, 60, False),
        ("r1lab-a-3", "a", "grpo", "RUNNING", 7, 40, True),
    ]
    assert "raysubmit_plain" not in c.read, "a plain job's log was read"
    assert listed[1].start_time_ms == 2 and listed[2].info == "reward 0.3"


def test_a_job_is_found_by_submission_id_or_by_its_runs_latest_job():
    c = _cluster()
    assert jobs.find_job(c, "r1lab-a-1").status == "STOPPED"
    assert jobs.find_job(c, "a").job_id == "r1lab-a-3"
    assert jobs.find_job(c, "from-config").job_id == "raysubmit_r1"
    assert jobs.find_job(c, "raysubmit_plain", active_only=True).run is None
    with pytest.raises(LookupError, match="no running run or job named 'r1lab-a-1'.*runs: a, from-config.*"
                                          "other jobs: raysubmit_plain"):
        jobs.find_job(c, "r1lab-a-1", active_only=True)


def test_a_plain_job_cannot_be_resumed():
    c = _cluster()
    with pytest.raises(RuntimeError, match="not an r1lab run"):
        jobs.resume(c, jobs.find_job(c, "raysubmit_plain"))
    with pytest.raises(RuntimeError, match="still RUNNING; stop it first"):
        jobs.resume(c, jobs.find_job(c, "a"))


def test_status_prints_runs_and_other_jobs(monkeypatch):
    monkeypatch.setattr(jobs, "connect", lambda address: ("http://head:8300", _cluster()))
    result = CliRunner().invoke(cli.app, ["status", "--address", "head:6379"], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "r1lab runs on http://head:8300" in out and "other Ray jobs" in out
    assert re.search(r"│ a +│ grpo +│ RUNNING +│ 7/40 +│ reward 0\.2 +│ r1lab-a-3 ", out), out
    assert re.search(r"│ from-config +│ grpo +│ RUNNING +│ 5/60 .*│ raysubmit_r1 ", out), out
    assert re.search(r"│ raysubmit_plain +│ RUNNING +│ python -c 'import time; time.sleep\(600\)' +│ ", out), out
    assert "r1lab-stop-a-2" not in out and "my_driver" not in out


def test_status_without_a_cluster_exits_non_zero_with_the_fix(monkeypatch, no_env):
    monkeypatch.setattr(jobs, "local_gcs", lambda: None)
    result = CliRunner().invoke(cli.app, ["status"], env={"COLUMNS": "220"})
    assert result.exit_code == 2
    assert "no Ray cluster" in result.output and "--address" in result.output
    result = CliRunner().invoke(cli.app, ["logs", "x", "--address", "127.0.0.1:1"], env={"COLUMNS": "220"})
    assert result.exit_code == 2 and "nothing answers at the Ray address 127.0.0.1:1" in result.output


class FakeJobs(FakeClient):
    """Adds what stop and resume use: submissions end as SUCCEEDED, stopped jobs as STOPPED."""

    def __init__(self, details, logs):
        super().__init__(details, logs)
        self.submitted, self.stopped = [], []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs["submission_id"]

    def get_job_status(self, job_id):
        return SimpleNamespace(value="STOPPED" if job_id in self.stopped else "SUCCEEDED")

    def stop_job(self, job_id):
        self.stopped.append(job_id)

    def get_job_info(self, job_id):
        return SimpleNamespace(runtime_env={"working_dir": "gcs://_ray_pkg_abc.zip", "env_vars": {"A": "1"}})


def test_stop_asks_an_r1lab_run_to_checkpoint_in_its_own_environment_first():
    c = FakeJobs(_cluster().details, _cluster().logs)
    assert jobs.stop(c, jobs.find_job(c, "from-config", active_only=True), timeout_s=5) == "STOPPED"
    helper = c.submitted[-1]
    assert helper["entrypoint"] == "python -m orchestrator.control stop from-config"
    assert helper["runtime_env"] == {"working_dir": "gcs://_ray_pkg_abc.zip", "env_vars": {"A": "1"}}
    assert helper["metadata"] == {"r1lab_control": "from-config"} and c.stopped == ["raysubmit_r1"]

    assert jobs.stop(c, jobs.find_job(c, "a", active_only=True), timeout_s=5) == "STOPPED"
    assert c.submitted[-1]["entrypoint"].startswith("cd /src && ")
    assert c.submitted[-1]["entrypoint"].endswith(" -m orchestrator.control stop a")
    assert c.submitted[-1]["runtime_env"] == {}

    assert jobs.stop(c, jobs.find_job(c, "raysubmit_plain"), timeout_s=5) == "STOPPED"
    assert len(c.submitted) == 2, "a plain job got a graceful-stop helper"


def test_resume_submits_the_runs_job_again_with_resume_on():
    # A run started with run.overwrite=true resumes with it off (the two exclude each other).
    details = [_details("raysubmit_r1", "r1lab run grpo -c c.yaml run.overwrite=true", "STOPPED")]
    c = FakeJobs(details, {"raysubmit_r1": jobs.header_line("cfg-name", "grpo")})
    new = jobs.resume(c, jobs.find_job(c, "cfg-name"))
    sent = c.submitted[-1]
    assert new == sent["submission_id"] and new.startswith("r1lab-cfg-name-")
    assert sent["entrypoint"] == "r1lab run grpo -c c.yaml run.resume=true run.overwrite=false"
    assert sent["runtime_env"]["working_dir"] == "gcs://_ray_pkg_abc.zip"
    assert sent["metadata"] == {"r1lab_run": "cfg-name", "r1lab_stage": "grpo", "r1lab_resumed_from": "raysubmit_r1"}
