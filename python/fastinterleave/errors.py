"""Errors, and naming the user's lines in them."""

import linecache
import re

from . import _C

#: An intervention that cannot run as written: an edit that would change
#: nothing, a module that never ran, a misuse of the tracing API.
InterventionError = _C.InterventionError


_LOCATION = re.compile(r"\S+:\d+(?!\d)")


def source_line(location):
    """``"file.py:12"`` → ``"file.py:12: a[:, 3] = 0"``."""
    file, _, lineno = location.rpartition(":")
    if not file or not lineno.isdigit():
        return location
    linecache.checkcache(file)  # a script edited and run again in this process: its new text
    text = linecache.getline(file, int(lineno)).strip()
    return f"{location}: {text}" if text else location


def annotate(exc, graph):
    """Names the user's lines in an error the engine raised for graph nodes."""
    node = getattr(exc, "_fi_node", None)
    if node is None or graph is None:
        return exc
    where = graph.describe(node)
    if isinstance(exc, InterventionError):
        known = set(graph.lines)
        msg = exc.args[0] if exc.args else ""
        msg = _LOCATION.sub(lambda m: source_line(m.group(0)) if m.group(0) in known else m.group(0), msg)
        exc.args = (msg,)
    else:
        exc.add_note(f"fastinterleave: raised by the intervention at {where}")
    return exc
