"""Which fork-server a step's workers come from (engine.preload, sandbox.lazy_numpy).

The scan is checked on plain files; the lean fork-server through real runs:
its workers start without numpy and pandas, can still import them (with
pyarrow's numpy and pandas support intact), and a step that did so gets the
pandas fork-server next time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from apputil import app_runner, rows, write_app

from stepwell.engine.preload import node_uses_pandas


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"n.py": "def fib(n):\n    return n\n"}, False),
        ({"n.py": "import pandas as pd\n"}, True),
        ({"n.py": "import numpy as np\n"}, True),
        ({"n.py": "from sklearn.linear_model import LinearRegression\n"}, True),
        ({"n.py": "import pyarrow as pa\nvalues = pa.array([1]).to_numpy()\n"}, True),
        ({"n.py": "import sklearnish\n"}, False),
        ({"n.py": "from patterns import Table\nTable('t').read_dataframe()\n"}, True),
        ({"n.py": "from patterns import Table\nTable('t').read(as_format='DataFrame')\n"}, True),
        ({"n.py": "from . import helpers\n", "helpers.py": "import pandas\n"}, True),
        ({"n.py": "from .helpers import f\n", "helpers.py": "import json\n"}, False),
        ({"n.py": "import lib.util\n", "lib/__init__.py": "", "lib/util.py": "import pandas\n"}, True),
        ({"n.py": "from lib import util\n", "lib/__init__.py": "", "lib/util.py": "# a DataFrame\n"}, True),
        ({"sub/n.py": "from .. import helpers\n", "helpers.py": "import pandas\n"}, True),
        ({"n.py": "import a\n", "a.py": "import b\n", "b.py": "import a, pandas\n"}, True),
        ({"n.py": "import a\n", "a.py": "import b\n", "b.py": "import a\n"}, False),
        ({"n.py": "def broken(:\n"}, False),
    ],
)
def test_node_uses_pandas_follows_the_app_modules_it_imports(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    node = next(name for name in files if name.endswith("n.py"))
    assert node_uses_pandas(tmp_path, node) is expected


# The node hides its use of numpy and pandas from the scan: its first run comes
# from the lean fork-server and imports them itself.
HIDDEN_NUMPY = """
import importlib, sys
import pyarrow as pa
from patterns import Table

had_np, had_pd = "num" + "py" in sys.modules, "pan" + "das" in sys.modules
had_processor = "stepwell.runtimes.processor.worker" in sys.modules
np = importlib.import_module("num" + "py")
Table("seen", "w").append({
    "had_np": had_np,
    "had_pd": had_pd,
    "had_processor": had_processor,
    "array_type": str(pa.array(np.arange(3, dtype="int16")).type),
    "scalar": np.int64(7),
    "small_float": np.float32(1.5),
    "stamp": np.datetime64("2026-01-02T03:04:05", "us"),
})
"""

HIDDEN_PANDAS = """
import importlib, sys
import pyarrow as pa
from patterns import Table

preloaded = "pan" + "das" in sys.modules
pd = importlib.import_module("pan" + "das")
series = pd.Series(pd.Categorical(["x", "y", "x"]))
frame = getattr(pd, "Data" + "Frame")({"n": [1, 2, 3], "label": series})
Table("seen", "w").append({
    "preloaded": preloaded,
    "series_type": str(pa.array(series).type),
    "frame_rows": pa.Table.from_pandas(frame).num_rows,
})
"""


def _run_twice(tmp_path, code: str) -> tuple[list, Path]:
    """Run a one-node app whose node is ``code`` twice in one host: (the two runs,
    the app's folder)."""
    app_root = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: hidden\n    node: hidden.py\n",
        "hidden.py": code,
    })  # fmt: skip
    with app_runner(app_root) as runner:
        runs = [runner.run_step("hidden"), runner.run_step("hidden")]
    return runs, app_root


def _seen_in_two_runs(tmp_path, code: str) -> list[dict]:
    runs, app_root = _run_twice(tmp_path, code)
    for run in runs:
        assert run.status == "succeeded", run.error
    return rows(app_root, "seen", order_by="patterns_id")


def test_lean_fork_server_workers_import_numpy_and_the_step_switches(tmp_path):
    seen = _seen_in_two_runs(tmp_path, HIDDEN_NUMPY)
    # the first worker came without numpy or pandas, the second with both loaded
    # ahead (and the other step styles' runtimes, which only that fork-server holds)
    assert [(row["had_np"], row["had_pd"]) for row in seen] == [(False, False), (True, True)]
    assert [row["had_processor"] for row in seen] == [False, True]
    # pyarrow's numpy support works in both: arrays keep their type, scalars convert
    assert [row["array_type"] for row in seen] == ["int16", "int16"]
    assert [row["scalar"] for row in seen] == [7, 7]
    assert [row["small_float"] for row in seen] == [1.5, 1.5]
    assert {str(row["stamp"])[:19] for row in seen} == {"2026-01-02 03:04:05"}


def test_lean_fork_server_workers_import_pandas_and_the_step_switches(tmp_path):
    seen = _seen_in_two_runs(tmp_path, HIDDEN_PANDAS)
    # the first worker came without pandas, the second with it loaded ahead
    assert [row["preloaded"] for row in seen] == [False, True]
    # pyarrow's own pandas support works in both (categoricals stay dictionaries)
    types = {row["series_type"] for row in seen}
    assert len(types) == 1 and types.pop().startswith("dictionary<"), seen
    assert [row["frame_rows"] for row in seen] == [3, 3]


def test_a_run_that_needed_numpy_without_importing_it_moves_its_step(tmp_path):
    # pyarrow needs numpy here but the node neither imports it nor names it
    code = "import pyarrow as pa\npa.infer_type([1, 2], mask=[False, True])\n"
    (first, second), _ = _run_twice(tmp_path, code)
    assert first.status == "failed" and "ndarray" in first.error, first.error
    assert second.status.startswith("succeeded"), second.error
