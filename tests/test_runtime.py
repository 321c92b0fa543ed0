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


def _stat_counters(monkeypatch, busy_share: dict[int, float]):
    """/proc/stat as seen twice by busy_cores: CPU c busy ``busy_share[c]`` of 1000 jiffies."""
    calls = []

    def fake():
        k = len(calls)
        calls.append(k)
        return {c: (int(1000 * share) * k, 1000 * k) for c, share in busy_share.items()}

    monkeypatch.setattr(cpus, "_cpu_times", fake)
    monkeypatch.setattr(cpus, "_own_cpu_seconds", lambda: 0.0)
    return calls


def test_one_free_core_gives_one_thread(monkeypatch, threads):
    # the affinity mask allows one core: one thread, whatever os.cpu_count says
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    _stat_counters(monkeypatch, {c: 0.0 for c in range(4)})  # every CPU idle
    torch.set_num_threads(2)
    assert runtime.apply_thread_policy(environ={}) == 1
    assert torch.get_num_threads() == 1


def test_a_core_taken_by_another_process_gets_no_thread(monkeypatch, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    calls = _stat_counters(monkeypatch, {0: 1.0, 1: 0.02})  # CPU 0 busy with a competitor
    assert runtime.apply_thread_policy(environ={}) == 1
    assert len(calls) >= 2  # measured, not guessed
    _stat_counters(monkeypatch, {0: 0.05, 1: 0.02})  # both idle: both cores
    assert runtime.apply_thread_policy(environ={}) == 2
    # a CPU outside the affinity mask being busy does not matter
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    _stat_counters(monkeypatch, {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0})
    assert cpus.free_cores(4) == pytest.approx(2.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpus.free_cores(2) == pytest.approx(2.0)


def test_busy_cores_subtracts_this_process(monkeypatch):
    _stat_counters(monkeypatch, {0: 1.0, 1: 1.0})  # both CPUs busy for 1000 jiffies
    seconds = 1000 / os.sysconf("SC_CLK_TCK")
    own = iter([10.0, 10.0 + seconds])  # ... one of them with us
    monkeypatch.setattr(cpus, "_own_cpu_seconds", lambda: next(own))
    assert cpus.busy_cores([0, 1], window=0.0) == pytest.approx(1.0)


def test_choose_threads_rounds_partly_busy_cores_down_and_caps():
    assert cpus.choose_threads(2, 2.0) == 2
    assert cpus.choose_threads(2, 1.8) == 2
    assert cpus.choose_threads(2, 1.5) == 1  # half a core left: a thread there would stall every region
    assert cpus.choose_threads(2, 0.0) == 1  # never 0
    assert cpus.choose_threads(8, 8.0, max_threads=3) == 3
    assert cpus.choose_threads(4, 9.0) == 4


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


def test_refresh_follows_a_competitor_that_starts_and_stops(monkeypatch, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    share = {0: 0.0, 1: 0.0}
    busy = {c: 0 for c in share}
    total = [0]

    def fake():
        total[0] += 100
        for c in share:
            busy[c] += int(100 * share[c])
        return {c: (busy[c], total[0]) for c in share}

    monkeypatch.setattr(cpus, "_cpu_times", fake)
    monkeypatch.setattr(cpus, "_own_cpu_seconds", lambda: 0.0)
    assert runtime.apply_thread_policy(environ={}) == 2
    share[1] = 1.0  # a competitor takes CPU 1
    assert runtime.refresh_thread_policy(min_interval=0.0) == 1 == torch.get_num_threads()
    share[1] = 0.0  # and leaves
    assert runtime.refresh_thread_policy(min_interval=0.0) == 2 == torch.get_num_threads()
    assert runtime.refresh_thread_policy(min_interval=1e9) == 2  # rate-limited: no look
    # fixed counts are never changed by a refresh
    runtime.apply_thread_policy(environ={"MESHSDF_THREADS": "2"})
    share[1] = 1.0
    assert runtime.refresh_thread_policy(min_interval=0.0) == 2
