"""A real `dagster dev` (webserver + daemon) on 127.0.0.1 for the tests that need one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS_QUERY = "{ runsOrError { ... on Runs { results { runId jobName status } } } }"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterDev:
    """`dagster dev` in its own process group, so that stopping it stops its children too."""

    def __init__(
        self,
        tmp: Path,
        source: Path | str,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        """`command` starts the server (default `python -m dagster dev -m e6score_dagster`); the
        host and port are appended."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "dagster_dev.log"
        (tmp / "dagster_home").mkdir()
        full_env = {
            **os.environ,
            "DAGSTER_HOME": str(tmp / "dagster_home"),
            "E6SCORE_HOME": str(tmp / "e6score_home"),
            "E6SCORE_DUMP_SOURCE": str(source),
            **(env or {}),
        }
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                *(command or [sys.executable, "-m", "dagster", "dev", "-m", "e6score_dagster"]),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited early (rc {self.proc.returncode})")
            try:
                if requests.get(f"{self.base}/server_info", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise TimeoutError(f"dagster dev did not answer within {timeout:.0f} s")

    def gql(self, query: str, **variables) -> dict:
        r = requests.post(
            f"{self.base}/graphql", json={"query": query, "variables": variables}, timeout=30
        )
        r.raise_for_status()
        body = r.json()
        assert "errors" not in body, body
        return body["data"]

    def runs(self) -> list[dict]:
        return self.gql(RUNS_QUERY)["runsOrError"]["results"]

    def wait_run(self, prefix: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        run: dict = {}
        while time.monotonic() < deadline:
            run = next((r for r in self.runs() if r["runId"].startswith(prefix)), {})
            if run.get("status") in FINISHED:
                return run
            time.sleep(2)
        raise TimeoutError(f"run {prefix} not finished within {timeout:.0f} s: {run}")
