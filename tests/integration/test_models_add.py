"""A model added with ``infergate models add`` is routed and run by a running node, with no code change."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import free_port, run_storescu, wait_for_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_added_model_is_routed_and_run_by_the_running_node(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(REPO / "models", models_dir)
    incoming = tmp_path / "incoming" / "ct-density-copy"
    shutil.copytree(REPO / "models" / "ct-bone-classifier", incoming)
    manifest = json.loads((incoming / "manifest.json").read_text())
    manifest["id"] = "ct-density-copy"
    (incoming / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (incoming / "routing.yaml").write_text(
        "rules:\n  - name: copy test\n    match: {modality: [CT], series_description: 'ADDED MODEL'}\n"
        "    models: [ct-density-copy]\n"
    )
    scp_port, api_port = free_port(), free_port()
    env = node_env(
        data_dir=tmp_path / "var", models_dir=models_dir, scp_port=scp_port, api_port=api_port, series_quiet_seconds=2
    )
    node = NodeProcess(["up"], env, tmp_path / "up.log").start()
    try:
        wait_for_port("127.0.0.1", scp_port, timeout=60)
        api = f"http://127.0.0.1:{api_port}"
        wait_for_http(f"{api}/health", timeout=60)

        added = subprocess.run(
            [sys.executable, "-m", "infergate.cli", "models", "add", str(incoming)],
            env={**env, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert added.returncode == 0, added.stdout + added.stderr
        assert (models_dir / "ct-density-copy" / "model.onnx").is_file()

        info = write_ct_series(tmp_path / "ct", slices=12, size=128, series_description="ADDED MODEL")
        sent = run_storescu(info.folder, port=scp_port, aec="INFERGATE")
        assert sent.returncode == 0, sent.stderr
        results = wait_for_results(api, info.study_uid, timeout=90, jobs=3)
        states = {job["model_id"]: job["state"] for series in results["series"] for job in series["jobs"]}
        assert states == {"ct-tissue-seg": "done", "ct-bone-classifier": "done", "ct-density-copy": "done"}, states
    except BaseException:
        print(node.log_text()[-10000:])  # noqa: T201
        raise
    finally:
        node.stop()
