"""The `cdp` command line, run as a real process against real files and a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CDP = [sys.executable, "-m", "cdp.cli"]


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update({"CDP_DATA_DIR": str(data_dir), "CDP_LOG_JSON": "false"})
    return env


def cdp(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a `cdp` command in its own process."""
    return subprocess.run(
        [*CDP, *args], env=_env(data_dir), capture_output=True, text=True, timeout=300
    )


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[str], deadline_s: float = 120) -> None:
    """Poll `/readyz` until the server answers, failing early if the process died."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    """A real `cdp serve` process on a free port."""
    port = free_port()
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [*CDP, "serve", "--port", str(port), "--no-scheduler"],
            env=_env(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url, proc, tmp_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_every_command_has_useful_help(tmp_path: Path) -> None:
    for command in (
        [],
        ["init"],
        ["migrate"],
        ["serve"],
        ["keys"],
        ["keys", "create"],
        ["demo"],
        ["sample-data"],
        ["jobs", "run"],
    ):
        result = cdp(tmp_path, *command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout
        assert len(result.stdout) > 100


def test_init_creates_both_stores_and_prints_an_admin_key(tmp_path: Path) -> None:
    result = cdp(tmp_path, "init")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cdp.sqlite3").exists()
    assert (tmp_path / "warehouse.duckdb").exists()
    assert result.stdout.strip().splitlines()[-1].startswith("cdp_")
    again = cdp(tmp_path, "init")
    assert again.returncode == 0
    assert "exists already" in again.stderr


def test_keys_create_prints_the_key_last_and_the_server_accepts_it(
    server: tuple[str, subprocess.Popen[str], Path],
) -> None:
    url, _, data_dir = server
    result = cdp(data_dir, "keys", "create", "--role", "admin", "--name", "ops")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    resp = httpx.get(f"{url}/api/keys", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200
    assert [k["name"] for k in resp.json()["items"]] == ["ops"]
    listed = cdp(data_dir, "keys", "list")
    assert "ops" in listed.stdout
    assert key not in listed.stdout
    key_id = resp.json()["items"][0]["id"]
    assert cdp(data_dir, "keys", "revoke", key_id).returncode == 0
    assert (
        httpx.get(f"{url}/api/keys", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    )


def test_served_app_has_docs_request_ids_and_json_errors(
    server: tuple[str, subprocess.Popen[str], Path],
) -> None:
    url, _, _ = server
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/api/keys" in spec["paths"]
    missing = httpx.get(f"{url}/api/keys")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["x-request-id"]


def test_a_cli_command_needing_the_warehouse_names_the_server_holding_it(
    server: tuple[str, subprocess.Popen[str], Path],
) -> None:
    url, _, data_dir = server
    result = cdp(data_dir, "jobs", "run", "warehouse.checkpoint")
    assert result.returncode == 1
    assert "in use by cdp server" in result.stderr
    assert url.rsplit(":", 1)[1] in result.stderr
    assert "Traceback" not in result.stderr


def test_server_stops_cleanly_and_releases_the_warehouse(
    server: tuple[str, subprocess.Popen[str], Path],
) -> None:
    _, proc, data_dir = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it received.
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    # The lifespan closed the warehouse, which removes the holder file.
    assert not (data_dir / "warehouse.duckdb.holder.json").exists()
    result = cdp(data_dir, "jobs", "run", "warehouse.checkpoint")
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout


def test_unknown_key_revocation_is_a_clean_error(tmp_path: Path) -> None:
    assert cdp(tmp_path, "migrate").returncode == 0
    result = cdp(tmp_path, "keys", "revoke", "no-such-key")
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
