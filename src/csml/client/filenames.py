"""Local file names made from names the coordinator sends (outputs, models).

Invariant: the client writes a file under a folder the user chose only under a
name that is one plain file name: not empty, not `.` or `..`, no leading dot (no
hidden files such as `.bashrc`), no path separator or drive colon (so never an
absolute or relative path), no control characters, at most 255 characters, and
only ASCII letters, digits, `.`, `_` and `-` (what the service's output, step and
model names are made of). Anything else is refused with a `CsmlError` naming it,
whoever sent it: a hostile or broken coordinator cannot make the client write
outside the folder, hide a file or overwrite a dotfile.
"""

from __future__ import annotations

import re
import unicodedata

from csml.client.errors import CsmlError

MAX_LENGTH = 255
_PLAIN = re.compile(r"^[A-Za-z0-9._-]+$")


def _problem(name: str) -> str | None:
    if _PLAIN.match(name) and len(name) <= MAX_LENGTH and not name.startswith("."):
        return None  # the usual case, at once: the checks below all pass for such a name
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "it names a folder"
    if any(sep in name for sep in ("/", "\\")):
        return "it is a path, not a file name"
    if ":" in name:
        return "it holds a drive colon"
    if any(unicodedata.category(ch)[0] == "C" for ch in name):
        return "it holds control characters"
    if name.startswith("."):
        return "it would be a hidden file"
    if len(name) > MAX_LENGTH:
        return f"it is longer than {MAX_LENGTH} characters"
    if not _PLAIN.match(name):
        return "only letters, digits, '.', '_' and '-' are allowed"
    return None


def check_file_name(name: str, what: str = "output") -> str:
    """`name` if it is safe as a file name in a folder the user chose; else CsmlError."""
    problem = _problem(name)
    if problem is not None:
        shown = repr(name) if len(name) <= 80 else repr(name[:80]) + "..."
        raise CsmlError(f"refusing the {what} name {shown}: {problem}")
    return name
