"""The thread policy (lib.cpus, lib.runtime.apply_thread_policy): cores, quotas, the knob."""
import os

import pytest
import torch

from lib import cpus, runtime
from lib.errors import MeshSDFError


@pytest.fixture
def threads():
    """Restores torch's thread count after the test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_one_free_core_gives_one_thread(monkeypatch, threads):
    # the affinity mask allows one core: one thread, whatever os.cpu_count says
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # 1 of os.cpu_count() cores
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    torch.set_num_threads(2)
    assert runtime.apply_thread_policy(environ={}) == 1
    assert torch.get_num_threads() == 1


def test_threads_follow_the_usable_cores_and_the_cap(monkeypatch, threads):
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert runtime.apply_thread_policy(environ={}) == 3 == torch.get_num_threads()
    assert runtime.apply_thread_policy(max_threads=2, environ={}) == 2 == torch.get_num_threads()
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 0.5)  # half a CPU of quota: one thread
    assert runtime.apply_thread_policy(environ={}) == 1
    assert cpus.choose_threads(4, max_threads=0) == 1  # never 0


def test_cgroup_quota_caps_the_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    v2 = tmp_path / "v2"
    v2.mkdir()
    monkeypatch.setattr(cpus, "_cgroup_dirs", lambda: [v2])
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_cpu_limit() == pytest.approx(1.5)
    assert cpus.usable_cores() == 2
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit() is None and cpus.usable_cores() == 8
    v1 = tmp_path / "v1"
    v1.mkdir()
    monkeypatch.setattr(cpus, "_cgroup_dirs", lambda: [tmp_path / "absent", v1])
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.usable_cores() == 3
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpu_limit() is None


def test_the_knob_and_omp_num_threads_override_auto(monkeypatch, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    torch.set_num_threads(2)
    assert runtime.apply_thread_policy(environ={"MESHSDF_THREADS": "3"}) == 3 == torch.get_num_threads()
    torch.set_num_threads(2)
    assert runtime.apply_thread_policy(environ={"MESHSDF_THREADS": "off"}) == 2 == torch.get_num_threads()
    assert runtime.apply_thread_policy(environ={"OMP_NUM_THREADS": "2"}) == 2  # the user's explicit choice
    assert "MESHSDF_THREADS=auto" in runtime.thread_policy_summary()
    for bad in ("0", "two", "-1"):
        with pytest.raises(MeshSDFError, match="MESHSDF_THREADS"):
            runtime.apply_thread_policy(environ={"MESHSDF_THREADS": bad})


def test_openmp_wait_policy_is_passive_unless_the_user_chose():
    env = {}
    assert cpus.prepare_openmp_env(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    for given in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}, {"KMP_BLOCKTIME": "5"},
                  {"MESHSDF_THREADS": "off"}, {"MESHSDF_THREADS": "nonsense"}):
        env = dict(given)
        assert not cpus.prepare_openmp_env(env) and env == given
    # importing lib (which every script does before torch) applied it to this process
    assert os.environ.get("OMP_WAIT_POLICY") or os.environ.get("MESHSDF_THREADS") == "off"


@pytest.mark.parametrize("script, argv", [
    ("train_deep_sdf", ["-e", "EXP"]), ("train_svr", ["-e", "EXP"]), ("reconstruct_svr", ["-e", "EXP"]),
    ("demo_optimizer", ["-e", "EXP"]), ("prepare_data", ["--builtin", "bob_and_spot", "--out", "EXP"]),
])
def test_every_script_applies_the_policy_first(script, argv, monkeypatch, tmp_path):
    # a malformed knob stops the script before it reads anything: the policy runs at the top of main
    import importlib

    monkeypatch.setenv("MESHSDF_THREADS", "many")
    mod = importlib.import_module(script)
    with pytest.raises(MeshSDFError, match="MESHSDF_THREADS='many'"):
        mod.main([a.replace("EXP", str(tmp_path / "missing")) for a in argv])
    assert not (tmp_path / "missing").exists()
