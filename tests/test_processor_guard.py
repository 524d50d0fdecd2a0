"""Attempts to get out of the processor's restricted Python, each through a real
worker process. Every attempt must end in a failed run with a clear error; none
may reach a module outside the allow-list or a raw builtin."""

from __future__ import annotations

import textwrap

import pytest
from apputil import rows, run_app, write_app

#: name -> (statement, fragment the run's error must contain)
ATTEMPTS: dict[str, tuple[str, str]] = {
    "dunder_import_name": (
        "os = __import__('os')",
        "the name '__import__' is not allowed",
    ),
    "import_os": ("import os", "import of module 'os' is not allowed"),
    "import_importlib": ("import importlib", "import of module 'importlib' is not allowed"),
    "import_builtins": ("import builtins", "import of module 'builtins' is not allowed"),
    "builtins_name": (
        "imp = __builtins__['__import__']",
        "the name '__builtins__' is not allowed",
    ),
    "eval_builtin": ("eval('1 + 1')", "name 'eval' is not defined"),
    "exec_builtin": ("exec('x = 1')", "name 'exec' is not defined"),
    "open_builtin": ("open('/etc/passwd')", "name 'open' is not defined"),
    "globals_builtin": ("g = globals()", "name 'globals' is not defined"),
    "vars_on_module": ("import json\nv = vars(json)", "name 'vars' is not defined"),
    "private_module_attribute": (
        "import random\nos = random._os",
        "attribute '_os' is not accessible",
    ),
    "getattr_private_module_attribute": (
        "import random\nos = getattr(random, '_' + 'os')",
        "attribute '_os' is not accessible",
    ),
    "module_reexport_codecs": (
        "import json\nsys = json.codecs.sys",
        "json.codecs is the module 'codecs', which is not allowed",
    ),
    "module_reexport_ssl_os": (
        "import ssl\nssl.os.system('id')",
        "ssl.os is the module 'os', which is not allowed",
    ),
    "module_reexport_datetime_sys": (
        "import datetime\nos = datetime.sys.modules['os']",
        "datetime.sys is the module 'sys', which is not allowed",
    ),
    "submodule_of_submodule": (
        "import json\nscanner = json.decoder.scanner",
        "json.decoder.scanner is the module 'json.scanner', which is not allowed",
    ),
    "function_globals": (
        "g = (lambda: 0).__globals__",
        "attribute '__globals__' is not accessible",
    ),
    "getattr_dynamic_dunder": (
        "g = getattr(sleep, '__glo' + 'bals__')",
        "attribute '__globals__' is not accessible",
    ),
    "getattr_str_subclass_name": (
        "class Name(str):\n"
        "    def startswith(self, prefix):\n"
        "        return False\n"
        "g = getattr(sleep, Name('__globals__'))",
        "attribute '__globals__' is not accessible",
    ),
    "subclasses_walk": (
        "classes = ().__class__.__bases__[0].__subclasses__()",
        "attribute '__subclasses__' is not accessible",
    ),
    "generator_frame": (
        "def gen():\n    yield 1\nframe = gen().gi_frame",
        "attribute 'gi_frame' is not accessible",
    ),
    "getattr_generator_frame": (
        "def gen():\n    yield 1\nframe = getattr(gen(), 'gi_' + 'frame')",
        "attribute 'gi_frame' is not accessible",
    ),
    "coroutine_frame": (
        "frame = getattr(sleep(0), 'cr_frame')",
        "attribute 'cr_frame' is not accessible",
    ),
    "traceback_frame": (
        "try:\n    1 / 0\nexcept ZeroDivisionError as exc:\n    tb = getattr(exc, '__traceback__')",
        "attribute '__traceback__' is not accessible",
    ),
    "format_string_walk": (
        "text = '{0.__globals__}'.format(sleep)",
        "format field {0.__globals__} reads attribute '__globals__'",
    ),
    "unbound_str_format": (
        "text = str.format('{0.__class__.__mro__}', 1)",
        "format field {0.__class__.__mro__} reads attribute '__class__'",
    ),
    "format_map_walk": (
        "text = '{x.gi_frame}'.format_map({'x': (i for i in [1])})",
        "format field {x.gi_frame} reads attribute 'gi_frame'",
    ),
    "string_formatter_super": (
        "import string\n"
        "class F(string.Formatter):\n"
        "    def get_field(self, name, args, kwargs):\n"
        "        return super().get_field(name, args, kwargs)\n"
        "text = F().format('{0.__globals__}', sleep)",
        "attribute '__globals__' is not accessible",
    ),
    "match_class_attribute": (
        "match sleep:\n    case object(__globals__=g):\n        pass",
        "attribute '__globals__' is not accessible",
    ),
    "module_is_read_only": (
        "import json\njson.dumps = print",
        "module 'json' is read-only",
    ),
    "openai_other_attribute": (
        "import openai\nopenai.requestssession = print",
        "module 'openai' is read-only in a processor statement except for its settings api_base",
    ),
    "openai_setting_not_plain": (
        "import openai\nopenai.api_key = print",
        "openai.api_key takes a str, number, bool, None or a dict of those",
    ),
    "log_internals": (
        "sink = getattr(log, '_sink')",
        "attribute '_sink' is not accessible",
    ),
    "relative_import": ("from . import proc", "relative imports are not allowed"),
    "interpreter_helper_by_name": (
        "import _strptime",
        "private modules cannot be imported ('_strptime')",
    ),
    "numpy_internals_by_name": (
        "import numpy._core._methods",
        "private modules cannot be imported ('numpy._core._methods')",
    ),
    "numpy_ctypeslib": (
        "import numpy\nlib = numpy.ctypeslib.load_library",
        "module 'numpy.ctypeslib' is not available in processor statements",
    ),
    "numpy_testing_exec": (
        "from numpy import testing\ntesting.measure('1')",
        "module 'numpy.testing' is not available in processor statements",
    ),
    "pandas_compat_importer": (
        "import pandas\nos = pandas.compat.import_optional_dependency('os')",
        "module 'pandas.compat' is not available in processor statements",
    ),
    "pandas_agg_getattr_gadget": (
        "import pandas as pd\n"
        "g = pd.DataFrame.agg(pd.DataFrame, '__getattribute__', 0, sleep, '__globals__')",
        "the function name '__getattribute__' is not allowed",
    ),
    "pandas_groupby_getattr_gadget": (
        "import pandas as pd\n"
        "grouped = type(pd.Series([1]).groupby([1]))\n"
        "g = grouped.aggregate(sleep, '__getattribute__', '__globals__')",
        "the function name '__getattribute__' is not allowed",
    ),
    "pandas_eval_attribute_walk": (
        "import pandas as pd\n"
        "frame = pd.DataFrame({'a': [1]})\n"
        "cls = frame.eval('a.__class__')",
        "attribute '__class__' is not accessible",
    ),
    "yaml_unsafe_load": (
        "import yaml\nyaml.unsafe_load(\"!!python/object/apply:os.system ['id']\")",
        "yaml.unsafe_load is not available in processor statements",
    ),
    "yaml_full_loader": (
        "import yaml\nyaml.load('!!python/name:os.system', Loader=yaml.FullLoader)",
        "yaml.FullLoader is not available in processor statements",
    ),
    "yaml_unsafe_loader_via_yamlobject": (
        "import yaml\n"
        "unsafe = yaml.YAMLObject.yaml_loader[-1]\n"
        "yaml.load(\"!!python/object/apply:os.remove ['/nonexistent']\", Loader=unsafe)",
        "python/... tags ('os.remove') are not allowed in a processor statement",
    ),
    "deepdiff_extract_private_path": (
        "import deepdiff\nimport warnings\n"
        "sys = deepdiff.extract(warnings.catch_warnings(), 'root._module.sys')",
        "attribute '_module' is not accessible in a processor statement",
    ),
    "deepdiff_delta_sets_private_attribute": (
        "import deepdiff\nimport string\n"
        "target = string.Template('x')\n"
        "target = target + deepdiff.Delta({'attribute_added': {'root._secret': 5}}, raise_errors=True)",
        "attribute '_secret' is not accessible in a processor statement",
    ),
    "module_reinit": (
        "import json\njson.__init__('os')",
        "attribute '__init__' is not accessible",
    ),
    "pickle_through_pandas": (
        "import io\nimport pandas as pd\n"
        "pd.read_pickle(io.BytesIO(b\"cos\\nsystem\\n(S'echo escaped'\\ntR.\"))",
        "pickle.find_class is not allowed in a processor step",
    ),
    "raw_file_descriptor": (
        "import io\nchannel = io.open(3, 'wb')",
        "io.open() of a file descriptor is not allowed",
    ),
}


@pytest.fixture(scope="module")
def attempt_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard") / "app"
    steps = "".join(
        f"""
          - name: {name}
            processor: {name}.py
            output: out_{name}
            output_schema: {{escaped: str}}
"""
        for name in ATTEMPTS
    )
    files = {"stepwell.yml": "steps:" + steps}
    for name, (statement, _) in ATTEMPTS.items():
        files[f"{name}.py"] = textwrap.dedent(statement) + "\nreturn [{'escaped': 'yes'}]\n"
    app = write_app(root, files)
    return app, {run.step: run for run in run_app(app)}


def test_enough_attempts():
    assert len(ATTEMPTS) >= 15


@pytest.mark.parametrize("name", list(ATTEMPTS))
def test_bypass_attempt_fails_clearly(attempt_runs, name):
    app, runs = attempt_runs
    run = runs[name]
    assert run.status == "failed", f"{name}: {run.status}"
    assert ATTEMPTS[name][1] in run.error, run.error
    assert rows(app, f"out_{name}") == []


def test_module_views_keep_working_code_working(tmp_path):
    """The guard must not get in the way of ordinary code."""
    app = write_app(
        tmp_path / "app",
        {
            "stepwell.yml": """
                steps:
                  - name: ok
                    processor: ok.py
                    output: out
                    output_schema: {text: str, n: int}
            """,
            "ok.py": """
                import json, string, math, random, itertools, base64, datetime, time
                import numpy as np
                import pandas as pd
                from xml import etree
                class Point:
                    def __init__(self, x):
                        self.x = x
                    def __repr__(self):
                        return f"Point({self.x})"
                class Sub(Point):
                    def __init__(self, x):
                        super().__init__(x * 2)
                frame = pd.DataFrame({"a": [1, 2, 3], "b": [4, 5, 6]})
                total = int(frame.query("a > 1").agg("sum")["b"]) + int(frame.eval("a + b").sum())
                grouped = frame.groupby("a").agg("max").shape[0]
                values = np.random.default_rng(1).integers(0, 10, 3)
                import openai
                openai.api_key = "sk-test"  # how openai 0.28 is configured
                openai.proxy = {"https": "http://proxy.invalid:3128"}
                total += len(openai.api_key) - 7
                # C code of allowed modules importing its own helpers on first use
                total += int(np.arange(3).sum()) + int(np.array([1.0, 3.0]).mean())
                total += datetime.datetime.strptime("2020-01-02", "%Y-%m-%d").day
                total += time.strptime("2020", "%Y").tm_year
                try:
                    json.nothing
                except AttributeError as exc:
                    missing = repr(exc.obj)
                text = "{0} {1:>4} {p.x}".format("a", 7, p=Sub(2)) + string.Template("$v").substitute(v="!")
                text += base64.b64encode(b"x").decode() + str(hasattr(frame, "a")) + missing
                return [{"text": text, "n": total + grouped + len(values) + math.floor(2.5)
                         + len(list(itertools.chain([1], [2]))) + len(dir(etree))}]
            """,
        },
    )
    run = run_app(app)[0]
    assert run.status == "succeeded", run.error
    (row,) = rows(app, "out")
    assert row["text"].startswith("a    7 4!eA==True<module 'json' (processor view)>")


def test_forged_protocol_frames_cannot_touch_other_tables(tmp_path):
    """Even with a raw file descriptor on the worker's channel (reachable as the
    type of a file object's ``.raw``), user code cannot write outside the step's
    own output: the host confines a processor to its input and output tables."""
    import struct

    import msgpack
    import pyarrow as pa

    from stepwell.sandbox.protocol import encode_table

    body = encode_table(pa.table({"x": [666]}))
    header = msgpack.packb({"op": "write", "table": "victim", "mode": "append"}, use_bin_type=True)
    frame = struct.pack("!II", len(header), len(body)) + header + body
    app = write_app(
        tmp_path / "app",
        {
            "stepwell.yml": """
                steps:
                  - name: seed
                    node: seed.py
                  - name: forge
                    processor: forge.py
                    output: forged
                    output_schema: {n: int}
            """,
            "seed.py": """
                from stepwell import Table
                Table("victim", "w").append([{"x": 1}])
            """,
            "forge.py": f"""
                import io
                raw_type = type(io.open({str(tmp_path / 'app' / 'forge.py')!r}, "rb").raw)
                for fd in range(3, 64):
                    try:
                        raw_type(fd, "wb", closefd=False).write({frame!r})
                    except Exception:
                        pass
                return [{{"n": 1}}]
            """,
        },
    )
    runs = {run.step: run for run in run_app(app)}
    assert runs["forge"].status == "failed"
    assert "may not write table 'victim'" in runs["forge"].error
    assert [r["x"] for r in rows(app, "victim")] == [1]
    assert rows(app, "forged") == []
