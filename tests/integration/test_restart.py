"""Completion state lives in SQL: a series received before a crash is processed after the restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from infergate.config import Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine
from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, node_env, wait_for_http, wait_for_results
from tests.helpers.peers import free_port, run_storescu, wait_for_port

pytestmark = pytest.mark.integration


def test_series_received_before_scp_crash_is_routed_after_restart(tmp_path: Path) -> None:
    scp_port, api_port = free_port(), free_port()
    data_dir = tmp_path / "var"
    engine = make_engine(Settings(data_dir=data_dir))
    upgrade(engine)
    engine.dispose()
    env = node_env(data_dir=data_dir, scp_port=scp_port, api_port=api_port, series_quiet_seconds=4)
    scp = NodeProcess(["scp"], env, tmp_path / "scp.log").start()
    processes = [scp]
    try:
        wait_for_port("127.0.0.1", scp_port, timeout=60)
        info = write_ct_series(tmp_path / "ct", slices=20, size=128)
        sent = run_storescu(info.folder, port=scp_port, aec="INFERGATE")
        assert sent.returncode == 0, sent.stderr
        scp.kill()  # SIGKILL within the quiet period: nothing was routed yet

        processes += [
            NodeProcess(["scp"], env, tmp_path / "scp2.log").start(),
            NodeProcess(["api"], env, tmp_path / "api.log").start(),
            NodeProcess(["worker"], env, tmp_path / "worker.log").start(),
        ]
        api = f"http://127.0.0.1:{api_port}"
        wait_for_http(f"{api}/health", timeout=60)
        results = wait_for_results(api, info.study_uid, timeout=90, jobs=2)
        assert results["series"][0]["num_instances"] == 20
        states = [job["state"] for series in results["series"] for job in series["jobs"]]
        assert states == ["done", "done"], results
    except BaseException:
        for process in processes:
            print(process.log_path.name, process.log_text()[-5000:])  # noqa: T201
        raise
    finally:
        for process in processes:
            process.stop()
