"""Two processes of one run check the run dir before either writes into it."""

import os
import subprocess
import sys
import textwrap

from trainutil import free_port

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import jax
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from jaxft.train.setup import _checked_run_dir
    run_dir = Path(sys.argv[3])
    if jax.process_index() == 1:
        time.sleep(3)  # process 1 looks late, as a process on a busy machine does
    _checked_run_dir(run_dir)
    if jax.process_index() == 0:  # what setup does next: process 0 starts the run dir
        (run_dir / "checkpoints").mkdir(parents=True)
    print("checked")
""")


def test_a_late_process_does_not_see_the_run_dir_half_made(tmp_path):
    """Process 0 creating `checkpoints/` before process 1 had looked made process 1 refuse
    the run dir as "not a jaxft run dir" (the cause of the two-process test's gloo timeouts)."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, address, str(i), str(tmp_path / "run")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    report = "\n".join(f"--- process {i}: {err[-2000:]}" for i, (_, err) in enumerate(outs))
    assert [p.returncode for p in procs] == [0, 0], report
    assert all(out.strip().endswith("checked") for out, _ in outs), report
