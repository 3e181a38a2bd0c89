"""The supervisor's hygiene: processes orphaned below it are re-parented to it and stopped."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[2]

SCRIPT = textwrap.dedent("""
    import subprocess, time, psutil
    from tooling.localcluster.processes import become_subreaper, kill_orphans
    become_subreaper()
    kept = subprocess.Popen(["sleep", "60"])
    # a service that starts a helper and dies (as a SIGKILLed worker leaves its vLLM engine behind)
    subprocess.run(["sh", "-c", "sleep 61 & echo $!"], check=True, stdout=open("orphan.pid", "w"))
    orphan = int(open("orphan.pid").read())
    deadline = time.monotonic() + 5
    while psutil.Process(orphan).ppid() != psutil.Process().pid and time.monotonic() < deadline:
        time.sleep(0.01)
    assert psutil.Process(orphan).ppid() == psutil.Process().pid, "not re-parented here"
    print(kill_orphans({kept.pid}))
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
    assert kept.poll() is None
    kept.kill()
""")


def test_orphans_are_reparented_to_the_supervisor_and_killed_but_kept_processes_are_not(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['sleep']"
