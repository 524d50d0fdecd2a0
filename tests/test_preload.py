"""Which fork-server a step's workers come from (engine.preload, sandbox.lazy_pandas).

The scan is checked on plain files; the lean fork-server through real runs:
its workers start without pandas, can still import it (with pyarrow's pandas
support intact), and a step that did so gets the pandas fork-server next time.
"""

from __future__ import annotations

import pytest
from apputil import app_runner, rows, write_app

from stepwell.engine.preload import node_uses_pandas


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"n.py": "def fib(n):\n    return n\n"}, False),
        ({"n.py": "import pandas as pd\n"}, True),
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


# The node hides its use of pandas from the scan: its first run comes from the
# lean fork-server and imports pandas itself.
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


def test_lean_fork_server_workers_import_pandas_and_the_step_switches(tmp_path):
    app_root = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: hidden\n    node: hidden.py\n",
        "hidden.py": HIDDEN_PANDAS,
    })  # fmt: skip
    with app_runner(app_root) as runner:
        first = runner.run_step("hidden")
        assert first.status == "succeeded", first.error
        second = runner.run_step("hidden")
        assert second.status == "succeeded", second.error
    seen = rows(app_root, "seen", order_by="patterns_id")
    # the first worker came without pandas, the second with it loaded ahead
    assert [row["preloaded"] for row in seen] == [False, True]
    # pyarrow's own pandas support works in both (categoricals stay dictionaries)
    types = {row["series_type"] for row in seen}
    assert len(types) == 1 and types.pop().startswith("dictionary<"), seen
    assert [row["frame_rows"] for row in seen] == [3, 3]
