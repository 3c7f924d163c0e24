"""Stands in for CTK's AppLauncher, which Slicer's ``PythonSlicer`` is in an installed Slicer: it starts the real
Python as its own child (no exec), the child sharing its stdin, stdout and stderr, forwards no signal, and exits
1 when its child was killed (the child's exit code otherwise). Usage: launcher_stand_in.py PROGRAM ARG..."""
import subprocess
import sys

code = subprocess.Popen(sys.argv[1:]).wait()
sys.exit(1 if code < 0 else code)
