"""What makes two train.py files the same: the exact text (for commits) and the program (for
de-duplication).

``text_sha`` is sha256 of the UTF-8 bytes: it names a text exactly, is written into every
candidate's commit message and is what ``attempts.text_sha`` records as the text a run used.

``program_sha`` identifies the *program*: the parsed module (``ast``) dumped without source
positions, so comments, blank lines, indentation style, line continuations, quote style and
other formatting do not change it, while any change to what runs does (a constant, a name, a
docstring, the order of statements). Two candidates with the same program would train the same
way, so the second is answered with the first's result instead of spending a run on it.

The dump's format belongs to the Python version that parsed it, so the hash is prefixed with
that version: after the coordinator's Python changes, old programs simply stop matching (one
extra run each), they are never mistaken for each other.
"""
from __future__ import annotations

import ast
import hashlib
import sys

PROGRAM_PREFIX = f"py{sys.version_info[0]}.{sys.version_info[1]}:"


def text_sha(text: str) -> str:
    """sha256 of the text's UTF-8 bytes (lone surrogates kept, as git stores them)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def program_sha(text: str) -> str:
    """Hash of the parsed program, positions and comments ignored. SyntaxError / ValueError if
    the text does not parse (a submission is compiled before it gets here)."""
    tree = ast.parse(text, filename="train.py")
    dump = ast.dump(tree, annotate_fields=True, include_attributes=False)
    return PROGRAM_PREFIX + hashlib.sha256(dump.encode("utf-8", "surrogatepass")).hexdigest()


__all__ = ["text_sha", "program_sha", "PROGRAM_PREFIX"]
