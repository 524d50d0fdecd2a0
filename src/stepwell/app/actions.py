"""``actions:`` of the app file: chains of steps called over HTTP, from the CLI or the UI.

An action (UI Bakery style) is an ordered list of steps. Each step has exactly
one *kind key*:

- ``python: file.py`` or ``code: |`` (inline): a Python function body over
  ``data``, ``error``, ``params``, ``user`` and the step's ``variables``; the
  value it returns is the step's result;
- ``sql: query.sql`` or ``sql: "SELECT ..."``: one SELECT over the app's tables,
  with variables bound as ``:name`` parameters; the rows are the result;
- ``action: other``: call another action with ``params:``;
- ``loop: other``: call another action once per item of the previous result (or
  of ``items:``), ``chunk_size`` at a time in parallel, at most ``max_iterations``.

Other keys: ``variables:`` (python/code/sql; ``{{ }}`` lookups evaluated before
the step), ``params:`` (action/loop), ``allow_failure:``, ``timeout:``.
``{{ }}`` inside code or SQL is an error that says to use variables.

These models are read by :func:`stepwell.app.loader.load_app`, which turns
their errors into one-line messages naming the file, line and key, checks that
files exist and that called actions are declared.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal, NoReturn

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stepwell.app.secrets import find_secret_refs

__all__ = ["ACTION_STEP_KINDS", "ActionSpec", "ActionStep", "action_problems", "action_files"]

ActionStepKind = Literal["python", "code", "sql", "action", "loop"]
ACTION_STEP_KINDS: tuple[ActionStepKind, ...] = ("python", "code", "sql", "action", "loop")

#: Keys that only some kinds of action steps accept.
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "variables": ("python", "code", "sql"),
    "params": ("action", "loop"),
    "items": ("loop",),
    "chunk_size": ("loop",),
    "max_iterations": ("loop",),
}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SQL_FILE = re.compile(r"[^\s;'\"]+\.sql")
_RESERVED = frozenset({"data", "error", "params", "user"})


def _fail(problem: str, hint: str, key: str | tuple[str | int, ...] | None = None) -> NoReturn:
    """Raise the validation error the loader turns into ``file:line: key: problem (hint)``."""
    ctx: dict[str, Any] = {"problem": problem, "hint": hint}
    if key is not None:
        ctx["key"] = (key,) if isinstance(key, str) else tuple(key)
    raise PydanticCustomError("stepwell", "{problem} ({hint})", ctx)


def _duration(value: Any) -> Any:
    from stepwell.app.models import parse_duration

    return None if value is None else parse_duration(value)


def _name(value: Any) -> Any:
    if isinstance(value, str) and not _NAME.fullmatch(value):
        _fail(f"bad name {value!r}",
              "use letters, digits, '_', '-' and '.', starting with a letter, digit or '_'")  # fmt: skip
    return value


Seconds = Annotated[float | None, BeforeValidator(_duration)]
Name = Annotated[str, BeforeValidator(_name)]


class _ActionModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def yaml_keys(cls) -> list[str]:
        """The keys this object accepts in the app file."""
        return list(cls.model_fields)


def _template_problem(value: Any, names: frozenset[str], key: tuple[str | int, ...]) -> None:
    from stepwell.runtimes.action import templating

    try:
        templating.check_value(value, names)
    except templating.TemplateProblem as exc:
        _fail(str(exc), "templates look values up: {{ params.x }}, {{ steps.<name>.data }}, "
                        "{{ user.roles }}", key)  # fmt: skip


class ActionStep(_ActionModel):
    """One step of an action. ``kind`` and ``source`` come from the kind key
    (``python: f.py`` -> kind ``python``, source ``f.py``)."""

    #: hints for keys a step of another kind takes that this one does not
    UNKNOWN_KEY_HINTS: ClassVar[dict[str, str]] = dict.fromkeys(
        ("memory", "cpu", "processes", "network", "tmp"),
        "set `{key}` for action steps in the app's `defaults:` (the app's actions share "
        "their warm workers)",
    )

    name: Name
    kind: ActionStepKind
    source: str
    """The file (python; sql when it names a .sql file), the inline code or SQL,
    or the called action's name (action, loop)."""
    description: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] | None = None
    items: str | list[Any] | None = None
    chunk_size: Annotated[int, Field(ge=1)] = 1
    max_iterations: Annotated[int, Field(ge=0)] | None = None
    allow_failure: bool = False
    timeout: Seconds = None

    #: line of the ``code:`` key in the app file (set by the loader)
    _key_line: int | None = PrivateAttr(default=None)

    @classmethod
    def yaml_keys(cls) -> list[str]:
        return ["name", *ACTION_STEP_KINDS,
                *[k for k in cls.model_fields if k not in ("name", "kind", "source")]]  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _kind_key(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            _fail("an action step must be a mapping",
                  "write it as `- name: ...` with one of python:, code:, sql:, action:, loop:")  # fmt: skip
        if not isinstance(data.get("name"), str) or not data["name"]:
            _fail("an action step needs a name", "add `name: <step name>` to it")
        present = [kind for kind in ACTION_STEP_KINDS if kind in data]
        for key in ("kind", "source"):
            if key in data:
                _fail(f"unknown key {key!r}",
                      "name the kind with one of python:, code:, sql:, action:, loop:", key)  # fmt: skip
        if not present:
            _fail("an action step needs one of the keys python:, code:, sql:, action: or loop:",
                  "add e.g. `code: return data` or `python: my_step.py`")  # fmt: skip
        if len(present) > 1:
            _fail(f"an action step has exactly one of python:, code:, sql:, action:, loop:; "
                  f"found {', '.join(present)}", "split it into one step per kind", present[1])  # fmt: skip
        kind = present[0]
        value = data[kind]
        if not isinstance(value, str) or not value.strip():
            example = {"python": "load_user.py", "code": "return data", "sql": "orders.sql",
                       "action": "other_action", "loop": "per_item_action"}[kind]  # fmt: skip
            _fail(f"`{kind}:` must be text, got {value!r}", f"write e.g. `{kind}: {example}`", kind)
        for key, kinds in _KIND_KEYS.items():
            if key in data and data[key] is not None and kind not in kinds:
                allowed = " and ".join(f"{k} steps" for k in kinds)
                _fail(f"`{key}` cannot be used on a {kind} step",
                      f"`{key}` is accepted by {allowed} only; remove it", key)  # fmt: skip
        rest = {k: v for k, v in data.items() if k != kind}
        if rest.get("variables") is None:
            rest.pop("variables", None)
        source = value if kind in ("code", "sql") else value.strip()
        return {**rest, "kind": kind, "source": source}

    @field_validator("variables", mode="after")
    @classmethod
    def _variable_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        from stepwell.runtimes.action.templating import CONTEXT_NAMES

        for name, item in value.items():
            if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
                _fail(f"bad variable name {name!r}",
                      "a variable becomes a Python name in the code: use letters, digits and "
                      "'_', not starting with a digit or '_'", (name,))  # fmt: skip
            if name in _RESERVED:
                _fail(f"variable {name!r} would hide the built-in `{name}`",
                      "choose another name; data, error, params and user are always there",
                      (name,))  # fmt: skip
            _template_problem(item, CONTEXT_NAMES, (name,))
        return value

    @model_validator(mode="after")
    def _check(self) -> ActionStep:
        from stepwell.runtimes.action.templating import CONTEXT_NAMES, LOOP_NAMES

        if self.kind in ("action", "loop"):
            _name(self.source)
        if self.params is not None:
            _template_problem(self.params, LOOP_NAMES if self.kind == "loop" else CONTEXT_NAMES,
                              ("params",))  # fmt: skip
        if self.items is not None:
            if isinstance(self.items, str):
                from stepwell.runtimes.action.templating import has_template

                if not has_template(self.items):
                    _fail("`items:` must be a list or a {{ }} expression giving one",
                          'write e.g. `items: "{{ steps.load.data }}"`', "items")  # fmt: skip
            _template_problem(self.items, CONTEXT_NAMES, ("items",))
        if self.kind == "code":
            self._check_code()
        if self.kind == "sql" and self.sql_file is None:
            from stepwell.runtimes.sqlcheck import expand_templates

            if "{{" in expand_templates(self.source):
                _fail("{{ }} templates cannot be used inside SQL",
                      "declare the value under the step's `variables:` and write :name in the "
                      "query", "sql")  # fmt: skip
        return self

    def _check_code(self) -> None:
        from stepwell.runtimes.action.code import compile_step, template_problem

        problem = template_problem(self.source, of=" of the code")
        if problem is not None:
            _fail(f"{{{{ }}}} templates cannot be used inside code ({problem})",
                  "pass values in through `variables:`", "code")  # fmt: skip
        try:
            compile_step(self.source, "<code>", list(self.variables))
        except SyntaxError as exc:
            where = f"line {exc.lineno} of the code" if exc.lineno else "the code"
            text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
            _fail(f"invalid Python ({exc.msg}, {where}{text})", "fix the code's syntax", "code")

    @property
    def sql_file(self) -> str | None:
        """The ``.sql`` file of a sql step (None for inline SQL)."""
        if self.kind == "sql" and _SQL_FILE.fullmatch(self.source.strip()):
            return self.source.strip()
        return None

    @property
    def file(self) -> str | None:
        """The file this step reads (python steps, sql steps naming a file)."""
        return self.source if self.kind == "python" else self.sql_file

    @property
    def code_line(self) -> int | None:
        """Line of the app file where an inline ``code:`` body's first line is
        (None when unknown): the key's own line for a one-line value, the next
        line for a block (``code: |``)."""
        if self._key_line is None or self.kind != "code":
            return None
        return self._key_line + (1 if "\n" in self.source else 0)


class ActionSpec(_ActionModel):
    """An action: named, with an ordered list of steps."""

    name: Name
    description: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    """Default params (the caller's params override them); may refer to secrets."""
    timeout: Seconds = None
    """Time limit of the whole action (default 90 s)."""
    steps: list[ActionStep]

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, value: Any) -> Any:
        if value is None:
            return {}
        from stepwell.runtimes.action.templating import has_template

        for text in _strings(value):
            if has_template(text.replace("${{", "")):
                _fail("default params cannot hold {{ }} templates",
                      "give literal values (or ${{ secrets.name }}); compute in a step instead")  # fmt: skip
        return value

    @field_validator("steps", mode="after")
    @classmethod
    def _unique_steps(cls, value: list[ActionStep]) -> list[ActionStep]:
        if not value:
            _fail("an action needs at least one step", "add a step under `steps:`")
        seen: dict[str, int] = {}
        for index, step in enumerate(value):
            if step.name in seen:
                _fail(f"duplicate action step name {step.name!r} (also steps[{seen[step.name]}])",
                      "give every step of an action its own name", (index, "name"))  # fmt: skip
            seen[step.name] = index
        return value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def secrets(self) -> list[str]:
        """Secret references used by the action's params and its steps, sorted."""
        values: list[Any] = [self.params]
        for step in self.steps:
            values.extend([step.variables, step.params, step.items])
        return sorted(find_secret_refs(values))

    def step(self, name: str) -> ActionStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def action_files(actions: list[ActionSpec]) -> Iterator[tuple[str, tuple[str | int, ...], str]]:
    """``(relative file, key path, what)`` of every file the actions name."""
    for a_index, action in enumerate(actions):
        for s_index, step in enumerate(action.steps):
            if step.file is not None:
                yield step.file, ("actions", a_index, "steps", s_index, step.kind), f"{step.kind} file"


def action_problems(actions: list[ActionSpec]) -> Iterator[tuple[tuple[str | int, ...], str, str]]:
    """``(key path, problem, hint)`` for action and loop steps calling unknown actions."""
    known = [action.name for action in actions]
    for a_index, action in enumerate(actions):
        for s_index, step in enumerate(action.steps):
            if step.kind in ("action", "loop") and step.source not in known:
                yield (("actions", a_index, "steps", s_index, step.kind),
                       f"no action named {step.source!r}",
                       f"declare it under `actions:`; known actions: {', '.join(known)}")  # fmt: skip
