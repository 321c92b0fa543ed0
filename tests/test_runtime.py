"""The thread policy (lib.runtime.cpus, lib.runtime.threads): cores, quotas, the knob, ThreadSettings."""
import os

import pytest
import torch

from lib import runtime
from lib.runtime import cpus
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


# ------------------------------------------------------------------ concurrently
def test_concurrently_runs_side_by_side_on_one_thread_each_and_restores_the_count():
    """With 2 intra-op threads the tasks run at the same time on different OS threads (each
    waits for the other: run in order they would time out), each on one intra-op thread and
    in the caller's grad mode; results come back in order and the count is restored.  With
    4 threads two tasks get 2 each."""
    import threading
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        barrier = threading.Barrier(2, timeout=10)

        def task(tag):
            def run():
                barrier.wait()      # both tasks must be running at once to pass
                return tag, threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()
            return run
        with torch.no_grad():
            out = runtime.concurrently([task("a"), task("b")])
        assert [o[0] for o in out] == ["a", "b"]
        assert out[0][1] == threading.get_ident() and out[1][1] != threading.get_ident()
        assert [o[2] for o in out] == [1, 1] and [o[3] for o in out] == [False, False]
        assert torch.get_num_threads() == 2
        x = torch.randn(50, 50, requires_grad=True)
        y, = runtime.concurrently([lambda: (x * 2).sum()])       # one task: the caller's grad mode, here on
        assert y.requires_grad
        torch.set_num_threads(4)                                 # a larger machine: the threads are shared out
        assert runtime.concurrently([torch.get_num_threads] * 2) == [2, 2]
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(old)


def test_concurrently_runs_tasks_in_the_callers_inference_mode():
    """Under ``torch.inference_mode`` a worker's task runs in it too: it may update the
    caller's inference tensors in place (outside the mode torch refuses), and grad stays off."""
    import threading
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            buf = torch.zeros(4)

            def fill(i):
                def run():
                    buf[i] = 1.0
                    return threading.get_ident(), torch.is_inference_mode_enabled(), torch.is_grad_enabled()
                return run
            out = runtime.concurrently([fill(0), fill(1)])
        assert out[1][0] != threading.get_ident() and [o[1:] for o in out] == [(True, False)] * 2
        assert buf.tolist() == [1.0, 1.0, 0.0, 0.0]
        with torch.no_grad():  # outside it, a worker's task is not in inference mode
            assert runtime.concurrently([torch.is_inference_mode_enabled] * 2) == [False, False]
    finally:
        torch.set_num_threads(old)


def test_concurrently_runs_each_task_on_the_same_worker_thread_every_call():
    """Task i always runs on worker thread i, also after a wider call made more workers: its
    thread-local scratch and malloc arena serve it again (a shared pool would hand it to
    whichever idle worker woke first, rotating among them)."""
    import threading
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runtime.concurrently([threading.get_ident] * 4)           # a wider call: at least 3 workers
        seen = {runtime.concurrently([threading.get_ident] * 2)[1] for _ in range(12)}
        assert len(seen) == 1 and threading.get_ident() not in seen
        wide = [runtime.concurrently([threading.get_ident] * 3)[1:] for _ in range(6)]
        assert all(w == wide[0] for w in wide) and wide[0][0] in seen and len(set(wide[0])) == 2
    finally:
        torch.set_num_threads(old)


def test_concurrently_runs_in_order_on_one_thread_nested_or_switched_off(monkeypatch):
    import threading
    old = torch.get_num_threads()
    me = threading.get_ident()
    here = lambda: threading.get_ident()  # noqa: E731
    try:
        torch.set_num_threads(1)
        assert runtime.concurrently([here, here]) == [me, me]
        torch.set_num_threads(2)
        # a section inside a section runs in order where it is (no deadlock, no third thread)
        inner = runtime.concurrently([lambda: runtime.concurrently([here, here]), here])
        assert inner[0] == [me, me] and inner[1] != me
        with runtime.thread_settings(concurrent=False):
            assert runtime.concurrently([here, here]) == [me, me]
        assert runtime.SETTINGS.concurrent                 # restored on the way out
        assert runtime.concurrently([here, here])[1] != me
    finally:
        torch.set_num_threads(old)


def test_concurrently_raises_a_task_error_after_every_task_finished():
    import time
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    done = []

    def slow():
        time.sleep(0.2)
        done.append(1)

    def bad():
        raise ValueError("boom")
    try:
        with pytest.raises(ValueError, match="boom"):
            runtime.concurrently([bad, slow])
        assert done == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_elementwise_section_runs_one_thread_and_gives_large_gemms_all(monkeypatch, threads):
    """With sleeping OpenMP threads: one intra-op thread inside the section, the process's
    count inside all_threads (unless disabled) and for the tasks of concurrently (which
    still run side by side), restored on the way out, also after an error."""
    import threading
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(2)
    barrier = threading.Barrier(2, timeout=10)

    def task():
        barrier.wait()   # both tasks at once, or this times out
        return torch.get_num_threads()
    with runtime.elementwise_section("cpu"):
        assert torch.get_num_threads() == 1
        with runtime.all_threads():
            assert torch.get_num_threads() == 2
            with runtime.elementwise_section():      # a section inside all_threads opens anew
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with runtime.all_threads(False):              # a small call stays on the one thread
            assert torch.get_num_threads() == 1
        with runtime.elementwise_section():           # nested: changes nothing
            assert torch.get_num_threads() == 1
        assert runtime.concurrently([task, task]) == [1, 1]
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="inside"):
        with runtime.elementwise_section():
            raise ValueError("inside")
    assert torch.get_num_threads() == 2
    with runtime.all_threads():                      # outside a section: nothing to give
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("case", ["busy-waiting", "one thread", "cuda", "switched off"])
def test_elementwise_section_changes_nothing_where_it_cannot_help(monkeypatch, threads, case):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(2)
    device = "cpu"
    if case == "busy-waiting":
        monkeypatch.delenv("OMP_WAIT_POLICY")
    elif case == "one thread":
        torch.set_num_threads(1)
    elif case == "cuda":
        device = torch.device("cuda")
    before = torch.get_num_threads()
    with runtime.thread_settings(one_thread=case != "switched off"):
        with runtime.elementwise_section(device):
            assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_thread_settings_refuse_an_unknown_name_and_restore_after_an_error():
    with pytest.raises(MeshSDFError, match="concurent"):
        with runtime.thread_settings(concurent=False):
            pass
    with pytest.raises(ValueError, match="inside"):
        with runtime.thread_settings(concurrent=False, one_thread=False):
            assert not runtime.SETTINGS.concurrent and not runtime.SETTINGS.one_thread
            raise ValueError("inside")
    assert runtime.SETTINGS == runtime.ThreadSettings()


def test_cpu_info_reads_vendor_flags_and_per_core_data_caches(tmp_path):
    info_file = tmp_path / "cpuinfo"
    info_file.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9999\n"
                         "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n\n"
                         "processor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: sse2\n")
    caches = tmp_path / "cache"
    for idx, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                               (3, "Unified", "32768K")]):
        d = caches / f"index{idx}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    info = cpus.cpu_info(info_file, caches)
    assert (info.vendor, info.model) == ("AuthenticAMD", "AMD EPYC 9999")  # the first processor's block
    assert {"avx2", "avx512f"} <= info.flags and info.vector_bits == 512
    assert info.caches == {1: 48 * 1024, 2: 1024 * 1024, 3: 32 * 1024 * 1024}  # the instruction cache left out
    assert "512-bit" in info.summary() and "L2 1024 KiB" in info.summary()
    assert cpus.CpuInfo(flags=["avx2"]).vector_bits == 256 and cpus.CpuInfo().vector_bits == 128
    missing = cpus.cpu_info(tmp_path / "absent", tmp_path / "absent")
    assert (missing.vendor, missing.flags, missing.caches, missing.vector_bits) == ("", frozenset(), {}, 128)
