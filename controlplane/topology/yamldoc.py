"""Topology YAML text to a plain document, refusing what would freeze or mislead the control plane.

The text is composed into YAML nodes by libyaml (PyYAML's C loader, about 8x faster than the
pure-Python one on a 10,000-cluster file; the Python loader where PyYAML was built without it),
then every node is checked, iteratively, before anything is constructed:

- size: a document over `MAX_DOCUMENT_BYTES`, or with more than `MAX_NODES` nodes, is refused;
- depth: nesting deeper than `MAX_DEPTH` (a topology is about 8 deep) is refused, so neither
  the constructor nor the validator can hit Python's recursion limit;
- integers: more than `MAX_INT_DIGITS` digits is refused (Python refuses 4,300 with a
  ValueError that names no field);
- aliases (`*name`): bounded. An alias shares a node, and a handful of them nested expands to
  gigabytes when the document is walked (a 556-byte "billion laughs" cost 4.4 s and 1 GB), so the
  size and depth the document would have with every alias written out are computed first (once
  per node, without expanding) and held to `MAX_NODES` and `MAX_DEPTH`; a recursive alias is
  refused. Aliases themselves are kept: `yaml.safe_dump` writes them for any value used twice;
- `<<` merge keys: refused (their override rules would hide the duplicate keys refused below);
- duplicate keys in a mapping: refused (YAML says keys are unique; PyYAML silently keeps the last,
  so `{port: 8080, port: 9090}` meant 9090).

Every problem is a ConfigError naming the field path (`clusters[3].endpoints[0].port`) and the
line; all of them are reported at once (`ConfigErrors`), not only the first.
"""

from __future__ import annotations

from typing import Any

import yaml

from controlplane.errors import ConfigError, ConfigErrors

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MAX_NODES = 2_000_000
MAX_DEPTH = 64
MAX_INT_DIGITS = 100
MAX_ERRORS = 50  # reported at once; past that, "and N more"
# A syntax error in a document up to this size is worded by the Python parser (the wording users know).
PYTHON_ERRORS_UP_TO = 256 * 1024

Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_INT = "tag:yaml.org,2002:int"
_MERGE = "tag:yaml.org,2002:merge"


def _line(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _key_text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else f"<{type(node).__name__} at {_line(node)}>"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def expanded_shape(root: yaml.Node) -> tuple[int, int, bool] | None:
    """(nodes, depth, any alias) of the document with every alias written out; None for a recursive alias.

    Computed once per distinct node (post-order, memoized), so a billion laughs costs its own
    size, not the billion."""
    memo: dict[int, tuple[int, int]] = {}
    open_: set[int] = set()
    shared = False
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = [memo[id(c)] for c in _children(node)]
            memo[key] = (1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0))
            open_.discard(key)
            continue
        if key in memo:
            shared = True
            continue
        if key in open_:
            return None
        open_.add(key)
        stack.append((node, True))
        for c in _children(node):
            if id(c) in memo:
                shared = True
            else:
                stack.append((c, False))
    nodes, depth = memo[id(root)]
    return nodes, depth, shared


def check_nodes(root: yaml.Node, *, source: str = "") -> list[ConfigError]:
    """Every problem of a composed document (see the module doc), in document order."""
    shape = expanded_shape(root)
    if shape is None:
        return [ConfigError(f"a YAML alias refers to a node that contains it ({_line(root)})", source=source)]
    if shape[0] > MAX_NODES:
        return [ConfigError(f"more than {MAX_NODES} YAML nodes with its aliases written out", source=source)]
    # Without aliases the walk below names the field that is too deep.
    if shape[2] and shape[1] > MAX_DEPTH + 1:
        return [ConfigError(f"nested deeper than {MAX_DEPTH} levels with its aliases written out", source=source)]
    errors: list[ConfigError] = []
    seen: set[int] = set()
    count = 0
    stack: list[tuple[yaml.Node, str, int]] = [(root, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            return [*errors, ConfigError(f"more than {MAX_NODES} YAML nodes", source=source)]
        where = path or "(document)"
        if id(node) in seen:
            continue  # an alias: the node was checked where it first stands; its size is bounded above
        seen.add(id(node))
        if depth > MAX_DEPTH:
            errors.append(
                ConfigError(f"nested deeper than {MAX_DEPTH} levels ({_line(node)})", path=path, source=source)
            )
            continue
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _INT and len(node.value) > MAX_INT_DIGITS:
                errors.append(
                    ConfigError(
                        f"integer of {len(node.value)} digits is too long ({_line(node)})", path=where, source=source
                    )
                )
            continue
        children: list[tuple[yaml.Node, str, int]] = []
        if isinstance(node, yaml.SequenceNode):
            children = [(child, f"{path}[{i}]", depth + 1) for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            keys: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                text = _key_text(key)
                child_path = f"{path}.{text}" if path else text
                if key.tag == _MERGE:
                    errors.append(
                        ConfigError(
                            f"YAML merge keys (<<) are not accepted ({_line(key)})", path=child_path, source=source
                        )
                    )
                    continue
                ident = (key.tag, text)
                if isinstance(key, yaml.ScalarNode) and ident in keys:
                    errors.append(
                        ConfigError(
                            f"duplicate key {text!r} ({_line(key)}; first on line {keys[ident]})",
                            path=child_path,
                            source=source,
                        )
                    )
                    continue
                keys[ident] = key.start_mark.line + 1
                children.append((key, child_path, depth + 1))
                children.append((value, child_path, depth + 1))
        stack.extend(reversed(children))
    return errors


def _python_loader_error(text: str) -> yaml.YAMLError | None:
    try:
        for _ in yaml.parse(text, Loader=yaml.SafeLoader):
            pass
    except yaml.YAMLError as exc:
        return exc
    return None


def load_document(text: str, *, source: str = "") -> Any:
    """YAML (or JSON) text to plain Python data; ConfigError (or ConfigErrors) naming every problem."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"is {size} bytes, more than the {MAX_DOCUMENT_BYTES} accepted", source=source)
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        errors = check_nodes(node, source=source)
        if errors:
            raise ConfigErrors(errors, limit=MAX_ERRORS)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        if Loader is not yaml.SafeLoader and size <= PYTHON_ERRORS_UP_TO:
            exc = _python_loader_error(text) or exc  # its wording is the one the docs and users know
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML: {problem}", path=where, source=source) from None
    except (ValueError, RecursionError, OverflowError) as exc:  # anything the checks above did not foresee
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None
    finally:
        loader.dispose()
