"""benchmarks/capacity.py: the load generator that measures what one PostgreSQL and one tracking
server carry. Its model (fast) and one short run against the real services (slow)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def capacity():
    spec = importlib.util.spec_from_file_location("capacity", ROOT / "benchmarks" / "capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_worker_table_keeps_w_over_t_strictly_under_the_ceiling(capacity):
    for c in (0.5, 5.3, 6.0, 12.25):
        for t in (0.1, 1, 10, 60):
            w = capacity.max_workers(c, t)
            assert w / t < c and (w + 1) / t >= c, (c, t, w)
    assert capacity.max_workers(5.0, 1) == 4  # 5 workers of 1 s each would be exactly the ceiling: one too many
    assert capacity.max_workers(5.3, 0.1) == 0


def test_the_ceiling_is_the_first_n_that_adds_under_ten_percent(capacity):
    table = pd.DataFrame({"clients": [1, 2, 4, 8, 16], "trials/s": [2.4, 4.5, 5.3, 5.0, 4.2]})
    assert capacity.ceiling(table) == (8, 5.3)  # 4 still added 18% over 2
    rising = pd.DataFrame({"clients": [1, 2], "trials/s": [1.0, 2.0]})
    assert capacity.ceiling(rising) == (None, 2.0)


@pytest.mark.slow
def test_a_short_run_against_the_real_services_prints_the_table_with_no_errors(tmp_path):
    from harness import cluster
    from harness.errors import UsageError

    try:
        cluster.postgres_bin()
    except UsageError as exc:
        pytest.skip(str(exc))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "capacity.py"), "--clients", "1", "2",
                          "--seconds", "4", "--warmup", "1", "--epochs", "40"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for n in (1, 2):
        line = re.search(rf"^  {n} clients: ([\d.]+) trials/s, (\d+) errors$", out.stdout, re.M)
        assert line and float(line[1]) > 0 and line[2] == "0", out.stdout
    assert "ceiling: C = " in out.stdout and "max workers W" in out.stdout
    rows = [l.split() for l in out.stdout.splitlines() if re.match(r"^\s+[12]\s+\d+\s+[\d.]+\s", l)]
    assert len(rows) == 2 and all(int(r[1]) > 0 for r in rows), out.stdout  # trials measured at each N
    assert "Traceback" not in out.stderr
