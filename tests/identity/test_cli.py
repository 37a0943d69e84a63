"""`cdp identity rebuild|resolve`, run as a real process."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cdp.test_cli import cdp


def test_identity_commands_resolve_and_rebuild(tmp_path: Path) -> None:
    assert cdp(tmp_path, "migrate").returncode == 0
    resolved = cdp(tmp_path, "identity", "resolve")
    assert resolved.returncode == 0, resolved.stderr
    assert json.loads(resolved.stdout.strip().splitlines()[-1])["mode"] == "incremental"
    rebuilt = cdp(tmp_path, "identity", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout.strip().splitlines()[-1])["mode"] == "full"
