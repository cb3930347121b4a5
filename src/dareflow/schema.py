"""Typed config files: the strict base model, bounded YAML reading, pydantic errors as
problem lines.

Recipes (``dareflow.recipe``), evaluation suites (``dareflow.evaluation.suite``) and sweep,
grid and similarity files (``dareflow.experiments.sweeps``) are pydantic models built on
:class:`StrictModel` (unknown keys are errors, numbers must be finite) and read with
:func:`read_yaml`; a validation failure becomes one :class:`~dareflow.errors.ProblemsError`
listing every problem (:func:`validation_problems`).

:func:`read_yaml` bounds what a config may cost before anything looks at it: the file size
(:data:`MAX_CONFIG_BYTES`), the nesting depth (:data:`MAX_YAML_DEPTH`) and the size once
YAML aliases are expanded (:data:`MAX_YAML_NODES` values, :data:`MAX_YAML_CHARS`
characters; a 566-byte "billion laughs" file expands to 10⁹ values). Anchors and aliases
within those bounds are fine. A key given twice in one mapping is an error (YAML would
silently keep the last value).
"""

import io
import os
import stat
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from dareflow.errors import QUOTE_CHARS, ProblemsError, quote

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_YAML_CHARS",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "StrictModel",
    "parse_yaml",
    "read_yaml",
    "validation_problems",
]

#: A config file larger than this is refused unread (the largest shipped one is ~3 KB).
MAX_CONFIG_BYTES = 1 << 20
#: Values (scalars, lists, mappings) a config may hold with its aliases expanded.
MAX_YAML_NODES = 100_000
#: Characters of scalar text a config may hold with its aliases expanded.
MAX_YAML_CHARS = 4 * MAX_CONFIG_BYTES
#: Nesting depth of lists and mappings.
MAX_YAML_DEPTH = 100
#: Characters of one problem line of :func:`validation_problems` (a safety net: values
#: in it are already quoted short).
MAX_PROBLEM_CHARS = 1000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are immutable once read."""

    # allow_inf_nan=False: `.nan` / `.inf` (YAML's spellings) are refused wherever a
    # float is taken (a weight, lambda, a threshold), with pydantic's "finite number"
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              allow_inf_nan=False)


class _ConfigYAMLError(yaml.YAMLError):
    """A config that is valid YAML but refused here (a duplicate key, too deep)."""


class _Bounded(Composer, SafeConstructor):
    """PyYAML's composer and safe constructor, bounding nesting and refusing duplicate
    keys. The composer is PyYAML's Python one in both loaders below: libyaml's recurses
    without a depth limit."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _ConfigYAMLError(
                    f"line {line}: nested more than {MAX_YAML_DEPTH} levels deep; a config "
                    "is a few levels of keys and lists")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # checked before PyYAML flattens merge keys (`<<: *defaults`): a key given next
        # to a merge key overrides the merged one, as YAML means it to
        seen: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not None:
                raise _ConfigYAMLError(
                    f"line {line}: key {quote(key)} is given twice in one mapping (first at "
                    f"line {first}); YAML would silently keep only the last value: keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _PurePythonLoader(Reader, Scanner, Parser, _Bounded, Resolver):
    """PyYAML's pure-Python parser, then :class:`_Bounded` (PyYAML built without libyaml)."""

    def __init__(self, stream: IO[str]):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)


_ConfigLoader: type = _PurePythonLoader
if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _LibyamlLoader(_Bounded, CParser, Resolver):
        """libyaml's parser (a 1 MB config in ~0.3 s instead of ~5 s), then
        :class:`_Bounded`."""

        def __init__(self, stream: IO[str]):
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _ConfigLoader = _LibyamlLoader


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(values, scalar characters) of ``root`` with every alias expanded.

    Aliases make the composed graph share nodes, so it stays small while its expansion
    (what pydantic, a model card or an error message would walk) is exponential. Sizes
    are summed bottom-up once per node, stopping at the first node over a bound.

    Raises:
        _ConfigYAMLError: over :data:`MAX_YAML_NODES` or :data:`MAX_YAML_CHARS`, or an
            alias inside its own anchor (a recursive structure).
    """
    sizes: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()  # the ancestors of the node being visited
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _children(node)
        if finished:
            open_nodes.discard(id(node))
            nodes = 1 + sum(sizes[id(c)][0] for c in children)
            chars = sum(sizes[id(c)][1] for c in children) + (
                len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
            if nodes > MAX_YAML_NODES or chars > MAX_YAML_CHARS:
                line = node.start_mark.line + 1
                raise _ConfigYAMLError(
                    f"line {line}: aliases (*name) expand this value to "
                    + (f"more than {MAX_YAML_NODES} values" if nodes > MAX_YAML_NODES
                       else f"more than {MAX_YAML_CHARS} characters")
                    + "; a config is refused above that size: write the values out, or "
                    "use fewer aliases")
            sizes[id(node)] = (nodes, chars)
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            line = node.start_mark.line + 1
            raise _ConfigYAMLError(
                f"line {line}: an alias refers to a value that contains it (a recursive "
                "structure); a config is a tree: remove the alias")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack += [(c, False) for c in children if id(c) not in sizes]
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def parse_yaml(text: str, source: str) -> Any:
    """The parsed YAML ``text`` of a config, within this module's bounds.

    Args:
        text: The YAML document.
        source: Its file or label, for the error.

    Raises:
        ProblemsError: not valid YAML, more than one document, a key given twice, nested
            too deeply, or too large once aliases are expanded (each message names the
            line).
    """
    stream = io.StringIO(text)
    stream.name = source  # PyYAML's messages name the stream
    loader = _ConfigLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except _ConfigYAMLError as e:
        raise ProblemsError(source, [str(e)]) from None
    except yaml.YAMLError as e:
        raise ProblemsError(source, [f"not valid YAML: {e}"]) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of the file ``path`` (a ``what``: "recipe", "suite", ...).

    The file must be a regular file of at most :data:`MAX_CONFIG_BYTES`, in UTF-8; the
    YAML is read within the bounds of :func:`parse_yaml`.

    Raises:
        FileNotFoundError: no such file (the message names the path and what was expected).
        ProblemsError: not a regular file, too large, not UTF-8, or see :func:`parse_yaml`
            (the error names the file).
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO named like a config returns at once instead of
        # waiting for a writer; fstat then refuses it (and folders, devices)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            f"{what} '{path}' does not exist; pass the path of a YAML file") from None
    except IsADirectoryError:
        raise ProblemsError(str(path), [_NOT_REGULAR.format(what=what)]) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ProblemsError(str(path), [_NOT_REGULAR.format(what=what)])
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ProblemsError(str(path), [
            f"{max(st.st_size, len(data))} bytes, more than the {MAX_CONFIG_BYTES} a config "
            + "may have; is this the right file?"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProblemsError(str(path), [
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} cannot be "
            + "decoded); save the file as UTF-8"]) from None
    return parse_yaml(text, str(path))


_NOT_REGULAR = "not a regular file (a folder, a pipe or a device); pass a YAML {what} file"


def validation_problems(error: ValidationError) -> list[str]:
    """One line per pydantic error: the dotted key, what is wrong, and the value given.

    A value is quoted with at most :data:`~dareflow.errors.QUOTE_CHARS` characters (then
    ``…``), and a line never exceeds :data:`MAX_PROBLEM_CHARS`: a message must not echo
    a huge value back.
    """
    out = []
    for e in error.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a dareflow or mergekit option); remove it or fix its spelling"
        elif e["type"] == "missing":
            msg = "required key is missing"
        msg = msg.removeprefix("Value error, ")
        given = e.get("input")
        if isinstance(given, str) and len(given) > QUOTE_CHARS:
            msg = msg.replace(given, given[:QUOTE_CHARS] + "…")
        quoted = f"'{given}'" in msg or quote(given) in msg  # the message names it already
        if e["type"] != "missing" and not isinstance(given, (dict, list)) and not quoted:
            msg = f"{msg} (got {quote(given)})"
        line = f"{loc}: {msg}"
        if len(line) > MAX_PROBLEM_CHARS:
            line = line[:MAX_PROBLEM_CHARS] + "…"
        out.append(line)
    return out
