"""pg_regress (sql/, expected/) and the isolation specs
(test/isolation/specs) under pytest: each test file or spec that passes is
one check, so a regression diff fails the test and names the file."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pg_regress's per-test line: "test name   ... ok   12 ms" (or "FAILED").
LINE = re.compile(r"^(?:test\s+)?(\S+)\s+\.\.\.\s+(ok|FAILED|failed \(ignored\))", re.M)


def run_script(r, script):
    out = subprocess.run([os.path.join(ROOT, "test", script)], capture_output=True,
                         text=True, timeout=1200)
    print(out.stdout[-20000:], out.stderr[-5000:])
    results = LINE.findall(out.stdout)
    r.check(len(results) > 0, "%s ran its tests" % script, out.stderr[-500:])
    for name, status in results:
        r.check(status == "ok", "%s: %s" % (script, name), status)
    r.eq(out.returncode, 0, "%s exits 0" % script)


def test_regress(r):
    run_script(r, "regress")


def test_isolation(r):
    run_script(r, "isolate")
