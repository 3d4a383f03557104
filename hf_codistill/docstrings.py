"""One wording per option: a dataclass's docstring documents its fields, and their `--help` is generated from it.

The docstring follows the Transformers/TRL layout: unindented "Parameters that ...:" section headers, each followed
by entries `name (`type`, *optional*, defaults to x):` indented once and their description indented twice.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from types import MappingProxyType
from typing import NamedTuple

_ENTRY = re.compile(r"(?P<name>\w+) \(`[^`]+`(, \*optional\*)?(, defaults to .+)?\):")
_CLOSING_REMARK = re.compile(r"\s*\([^()]*\)$")


class DocParameter(NamedTuple):
    section: str  # the section's header without its colon or a closing parenthetical remark
    text: str  # the description, whitespace-normalised


def parse_parameters(docstring: str) -> dict[str, DocParameter]:
    """The entries of the docstring's "Parameters that ...:" sections, by name, in order. Prose outside them (an
    unindented paragraph that does not start with "Parameters that") is skipped; a malformed entry or an empty
    section raises. As in `inspect.cleandoc`, the first line does not count for the indentation: start the
    docstring with a summary or a line break, not a section."""
    entries: dict[str, tuple[str, list[str]]] = {}
    section = header = name = entry_indent = None
    for line in [*inspect.cleandoc(docstring or "").splitlines(), "End."]:  # prose at the end closes the last section
        text, indent = line.strip(), len(line) - len(line.lstrip())
        if not text:
            continue
        if indent == 0:  # a section header (possibly over several lines) or prose
            if section is not None and entry_indent is None:
                raise ValueError(f"No indented `name (`type`, ...):` entries under {section!r}.")
            section = name = entry_indent = None
            header = f"{header} {text}" if header else text if text.startswith("Parameters that") else None
            if header and header.endswith(":"):
                section, header = _CLOSING_REMARK.sub("", header[:-1]), None
        elif section is not None:
            entry_indent = entry_indent or indent
            if indent == entry_indent:
                match = _ENTRY.fullmatch(text)
                if match is None or match["name"] in entries:
                    raise ValueError(f"Not a new `name (`type`, ...):` entry under {section!r}: {text!r}")
                name = match["name"]
                entries[name] = (section, [])
            elif indent > entry_indent and name is not None:
                entries[name][1].append(text)
            else:
                raise ValueError(f"Unexpected indentation under {section!r}: {text!r}")
    if empty := [name for name, (_, lines) in entries.items() if not lines]:
        raise ValueError(f"Entries without a description: {empty}.")
    return {name: DocParameter(section, " ".join(lines)) for name, (section, lines) in entries.items()}


def help_from_docstring(cls: type) -> type:
    """Class decorator, above `@dataclass`: the `help` metadata of every field that the class itself declares becomes
    its docstring entry's text (`%` doubled, as argparse formats help with it); the other metadata is kept. A field
    without an entry, or an entry without a field, raises, so that the two cannot drift apart."""
    documented = parse_parameters(cls.__doc__)
    own = [f for f in dataclasses.fields(cls) if f.name in inspect.get_annotations(cls)]
    undocumented = [f.name for f in own if f.name not in documented]
    unknown = sorted(documented.keys() - {f.name for f in own})
    if undocumented or unknown:
        raise ValueError(
            f"{cls.__name__}'s docstring must document each of its fields once: fields without an entry: "
            f"{undocumented}; entries without a field: {unknown}."
        )
    for f in own:
        f.metadata = MappingProxyType({**f.metadata, "help": documented[f.name].text.replace("%", "%%")})
    return cls
