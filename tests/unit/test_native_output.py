"""`launch.capture_native_output` / `route_native_output`: what is written to file descriptors 1 and 2 directly
(as C++ libraries do) lands in the log file, before and after it is known; Python's prints stay on the
terminal."""
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = '''
import os, sys
from clover_jax import launch

launch.capture_native_output()
os.write(2, b"native stderr before the log is known\\n")
os.write(1, b"native stdout before the log is known\\n")
print("clover_jax: ours on stdout")
print("error: ours on stderr", file=sys.stderr)
launch.route_native_output(sys.argv[1])
os.write(2, b"native stderr after\\n")
print("step 1/1 ours again")
'''


def test_native_lines_go_to_the_log_file_and_ours_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "x.log"
    log.parent.mkdir()
    log.write_text("earlier record\n")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "clover_jax: ours on stdout\nstep 1/1 ours again\n"
    assert proc.stderr == "error: ours on stderr\n"
    assert log.read_text() == ("earlier record\nnative stderr before the log is known\n"
                               "native stdout before the log is known\nnative stderr after\n")
