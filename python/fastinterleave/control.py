"""Python control flow on proxies (nnsight 0.4's ``CONFIG.APP.CONTROL_FLOW_HANDLING``).

While a trace is recorded, ``if proxy:`` (with its ``elif`` / ``else``) records a
branch, as ``with tracer.cond(proxy):`` / ``with branch.else_():`` would; at session
level it guards the session's steps (``session.cond``). ``for x in proxy:`` at
session level records a loop, as ``with session.iter(proxy) as x:`` would.

How: ``Proxy.__bool__`` finds the ``if`` statement being executed (the caller's
current bytecode instruction, mapped through its source position to the parsed
source), opens the branch and answers so that Python runs the ``if`` body, which
records into it. A trace function on that frame (``sys.settrace``) sees the first
line outside the body: the branch closes there, and if the statement has an
``else`` / ``elif``, an else-branch opens and the frame jumps (``f_lineno``) to it,
so that Python runs it too; its end closes it. A body that ends with its
function (no line follows) has its else part run there, on a copy of the
function's locals (nothing after it in the function could read them). The trace
function is removed as soon as no branch is open, when the frame returns or
unwinds, and when the trace exits (errors included); trace functions already
installed (a debugger, coverage) keep receiving their events meanwhile.

``for x in proxy:`` needs no trace function: the iterator returned gives the
loop variable once, and the loop closes when Python asks for the next item.
"""

import ast
import dis
import linecache
import operator
import sys
import threading

from . import _C
from .graph import CALL, OPEN

# Open branches of every thread, innermost last (a trace's or session's exit checks
# it); a frame's own are those with its `frame`.
BRANCHES = []

_JUMP_IF_FALSE = frozenset(("POP_JUMP_IF_FALSE", "POP_JUMP_FORWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_FALSE"))
_JUMP_IF_TRUE = frozenset(("POP_JUMP_IF_TRUE", "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_TRUE"))
_NOT_IF = (ast.IfExp, ast.BoolOp, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)

_BODY, _ELSE = 0, 1


# -- finding the statement being executed ---------------------------------------------------


class _IfInfo:
    """An ``if`` statement whose test is being evaluated: its lines and parts."""

    __slots__ = ("node", "filename", "negate", "body", "orelse", "else_code", "where")

    def __init__(self, node, filename, negate):
        self.node = node
        self.filename = filename
        self.negate = negate  # `if not proxy:` (the jump skips the body when the value is true)
        self.body = (node.body[0].lineno, max(s.end_lineno for s in node.body))
        self.orelse = (node.orelse[0].lineno, max(s.end_lineno for s in node.orelse)) if node.orelse else None
        self.else_code = None
        self.where = f"{filename}:{node.lineno}"

    def compiled_else(self):
        """The else part as code (same file, lines and columns as the source)."""
        if self.else_code is None:
            module = ast.Module(body=self.node.orelse, type_ignores=[])
            self.else_code = compile(module, self.filename, "exec")
        return self.else_code


_instructions = {}  # code object -> {offset: Instruction}
_statements = {}  # (code, file, offset) -> _IfInfo / ast.For, or an error message
_trees = {}  # filename -> (lines, tree)


def _instruction(code, offset):
    table = _instructions.get(code)
    if table is None:
        if len(_instructions) > 512:
            _instructions.clear()
        table = _instructions[code] = {ins.offset: ins for ins in dis.get_instructions(code)}
    return table.get(offset)


def _tree(frame):
    """The parsed source of the frame's file, or None."""
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if not lines:
        return None
    cached = _trees.get(filename)
    if cached is not None and cached[0] is lines:
        return cached[1]
    try:
        tree = ast.parse("".join(lines), filename)
    except SyntaxError:
        return None
    if len(_trees) > 64:
        _trees.clear()
    _trees[filename] = (lines, tree)
    return tree


def _span(node):
    return (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)


def _contains(span, pos):
    return (span[0], span[1]) <= (pos[0], pos[1]) and (pos[2], pos[3]) <= (span[2], span[3])


def _innermost(tree, pos, match):
    """The first node on the way down to `pos` for which ``match(node)`` is true."""
    node = tree
    while True:
        found = match(node)
        if found:
            return node
        for child in ast.iter_child_nodes(node):
            if not hasattr(child, "end_col_offset"):
                # A node without a position (arguments, withitem, match_case): look inside.
                if any(_contains(_span(c), pos) for c in ast.walk(child) if hasattr(c, "end_col_offset")):
                    node = child
                    break
                continue
            if _contains(_span(child), pos):
                node = child
                break
        else:
            return None


def _position(frame, names):
    """(instruction, position) of the frame's current instruction if its opcode is in `names`."""
    code = frame.f_code
    ins = _instruction(code, frame.f_lasti)
    if ins is not None and ins.opname == "TO_BOOL":  # Python 3.13+: the jump follows
        ins = _instruction(code, frame.f_lasti + 2 + 2 * _cache_entries("TO_BOOL"))
    if ins is None or ins.opname not in names:
        return None, None
    p = ins.positions
    if p is None or p.lineno is None or p.col_offset is None:
        return None, None
    return ins, (p.lineno, p.col_offset, p.end_lineno, p.end_col_offset)


def _cache_entries(opname):
    caches = getattr(dis, "_inline_cache_entries", None)
    if caches is None:
        return 0
    try:
        return caches[dis.opmap[opname]]
    except (KeyError, IndexError, TypeError):
        return 0


def _if_at(frame):
    """The `if` statement whose test the frame is evaluating (an _IfInfo), or an error text."""
    code = frame.f_code
    key = (code, code.co_filename, frame.f_lasti)  # (code objects compare by content, not file)
    found = _statements.get(key)
    if found is not None:
        return found
    found = _find_if(frame)
    if len(_statements) > 4096:
        _statements.clear()
    _statements[key] = found
    return found


_NO_SOURCE = (
    "the source of this code is not available (code run from a string?), so its `if` statement cannot be "
    "recorded: use `with tracer.cond(condition):` (and `.else_()`)"
)
_NOT_AN_IF = (
    "a proxy has no truth value while the trace is being recorded (its value is computed when the model "
    "runs): only an `if` / `elif` statement on a proxy records a branch; `and`, `or`, `not` outside an `if`, "
    "`while`, `x if proxy else y`, `bool(proxy)` and `assert` cannot. Use `&` / `|` to combine conditions, "
    "`with tracer.cond(condition):` for a branch, or test the saved value after the trace"
)


def _find_if(frame):
    ins, pos = _position(frame, _JUMP_IF_FALSE | _JUMP_IF_TRUE)
    if ins is None:
        return _NOT_AN_IF
    tree = _tree(frame)
    if tree is None:
        return _NO_SOURCE

    def match(node):
        if not isinstance(node, ast.If):
            return False
        if _span(node) == pos:
            return True
        test = node.test
        if not _contains(_span(test), pos):
            return False
        if isinstance(test, ast.BoolOp):
            return True  # `if a and b:` (an error, below)
        # The jump of a construct inside the test (`a if p else b`, a comprehension) is not the if's.
        return not any(isinstance(n, _NOT_IF) and _contains(_span(n), pos) for n in ast.walk(test))

    node = _innermost(tree, pos, match)
    if node is None:
        return _NOT_AN_IF
    if isinstance(node.test, ast.BoolOp):
        op = "and" if isinstance(node.test.op, ast.And) else "or"
        return (
            f"`if ... {op} ...:` on a proxy cannot be recorded (`{op}` needs the truth value of its operands "
            f"now): combine the conditions with `{'&' if op == 'and' else '|'}` "
            f"(`if (a > 0) {'&' if op == 'and' else '|'} (b > 0):`), or nest the `if` statements"
        )
    bad = _leaving(node.body) or _leaving(node.orelse)
    if bad is not None:
        return (
            f"`{bad}` inside `if proxy:` cannot be recorded: both branches are recorded now and one of them "
            "runs when the model runs, so the statement would leave the code now, whatever the condition. "
            "Assign a variable in each branch instead"
        )
    return _IfInfo(node, frame.f_code.co_filename, ins.opname in _JUMP_IF_TRUE)


def _leaving(stmts, in_loop=False):
    """The first statement in `stmts` that leaves them (return, break, continue, raise,
    yield, await) other than inside a nested function or loop; None if none."""
    for stmt in stmts:
        found = _leaving_node(stmt, in_loop)
        if found is not None:
            return found
    return None


def _leaving_node(node, in_loop):
    if isinstance(node, _SCOPES):
        return None
    if isinstance(node, ast.Return):
        return "return"
    if isinstance(node, ast.Raise):
        return "raise"
    if isinstance(node, (ast.Yield, ast.YieldFrom)):
        return "yield"
    if isinstance(node, ast.Await):
        return "await"
    if isinstance(node, (ast.Break, ast.Continue)) and not in_loop:
        return "break" if isinstance(node, ast.Break) else "continue"
    if isinstance(node, _LOOPS):
        for child in node.body:
            found = _leaving_node(child, True)
            if found is not None:
                return found
        if isinstance(node, ast.While):
            found = _leaving_node(node.test, in_loop)
            if found is not None:
                return found
        else:
            found = _leaving_node(node.iter, in_loop)
            if found is not None:
                return found
        return _leaving(node.orelse, in_loop)
    for child in ast.iter_child_nodes(node):
        found = _leaving_node(child, in_loop)
        if found is not None:
            return found
    return None


# -- if / elif / else -----------------------------------------------------------------------------


class _Branch:
    __slots__ = ("frame", "info", "block", "owner", "phase", "lo", "hi")

    def __init__(self, frame, info, block, owner):
        self.frame = frame
        self.info = info
        self.block = block
        self.owner = owner
        self.phase = _BODY
        self.lo, self.hi = info.body


def branch(proxy, frame):
    """``if proxy:`` in `frame`: opens the branch and returns what makes Python run its body."""
    blocks = OPEN.get()
    owner = blocks[-1] if blocks else None
    if owner is None:
        raise _C.InterventionError(
            "this proxy belongs to a trace that is no longer being recorded (its `with` block failed?): "
            "its truth value is not known"
        )
    info = _if_at(frame)
    if type(info) is str:
        raise _C.InterventionError(info)
    condition = proxy
    if info.negate:
        condition = owner._graph.add(CALL, "", (proxy,), None, fn=operator.not_)
    block = owner.cond(condition)
    block.__enter__()
    BRANCHES.append(_Branch(frame, info, block, owner))
    _install(frame)
    # `if proxy:` jumps past the body when false; `if not proxy:` when true.
    return not info.negate


# The trace functions: ours, and what was installed before (chained, then restored).
# sys.settrace is per thread: so is what it replaced.
_thread = threading.local()  # .previous: the thread's trace function before ours; .frames: frames traced
_frames = {}  # frame -> its local trace function before ours
_unwinding = set()  # frames an exception is passing through


def _top(frame):
    """The innermost open branch of `frame`, or None."""
    for b in reversed(BRANCHES):
        if b.frame is frame:
            return b
    return None


def _install(frame):
    state = _thread
    if not getattr(state, "frames", 0):
        state.previous = sys.gettrace()
        state.frames = 0
        sys.settrace(_global_trace)
    if frame not in _frames:
        _frames[frame] = frame.f_trace
        frame.f_trace = _local_trace
        state.frames += 1


def _global_trace(frame, event, arg):
    # New frames are traced only by what traced them before (a frame with an
    # `if proxy:` installs _local_trace itself).
    previous = getattr(_thread, "previous", None)
    if previous is not None:
        return previous(frame, event, arg)
    return None


def _release(frame):
    """Stops tracing `frame` (and the thread, once none of its frames is) for branches."""
    state = _thread
    traced = frame in _frames
    previous = _frames.pop(frame, None)
    _unwinding.discard(frame)
    frame.f_trace = previous
    if traced:
        state.frames -= 1
        if state.frames == 0:
            sys.settrace(state.previous)
            state.previous = None
    return previous


def _local_trace(frame, event, arg):
    if frame not in _frames:  # released (a stale reference)
        return None
    previous = _frames[frame]
    if previous is not None:
        try:
            _frames[frame] = previous(frame, event, arg)
        except BaseException:
            _frames[frame] = None
    try:
        keep = _on_event(frame, event)
    except BaseException:
        _abort_frame(frame)
        raise
    if keep:
        return _local_trace
    return _release(frame)


def _on_event(frame, event):
    """Closes the frame's branches its execution has left; whether to keep tracing it."""
    if event == "line":
        _unwinding.discard(frame)
        line = frame.f_lineno
        while True:
            b = _top(frame)
            if b is None:
                return False
            if b.lo <= line <= b.hi:
                return True
            b.block.__exit__(None, None, None)
            if b.phase == _BODY and b.info.orelse is not None:
                _open_else(b)
                try:
                    frame.f_lineno = b.lo
                except ValueError:
                    # Python cannot jump there from here: run the else part in place
                    # (only where that keeps its assignments: module-level code).
                    if frame.f_locals is not frame.f_globals:
                        raise _C.InterventionError(
                            f"the `else` part of the `if` statement at {b.info.where} cannot be recorded from "
                            "here: use `with tracer.cond(condition) as branch:` / `with branch.else_():`"
                        ) from None
                    sys.call_tracing(exec, (b.info.compiled_else(), frame.f_globals))
                    b.block.__exit__(None, None, None)
                    BRANCHES.remove(b)
                    continue
                return True
            BRANCHES.remove(b)
    if event == "exception":
        _unwinding.add(frame)
        return True
    if event == "return":
        if frame in _unwinding:
            _abort_frame(frame)
            return False
        # The body ended with its function: no line follows in this frame to jump
        # from. The else part runs here, on a copy of the locals (the function is
        # returning: nothing in it reads them after).
        while True:
            b = _top(frame)
            if b is None:
                return False
            b.block.__exit__(None, None, None)
            if b.phase == _BODY and b.info.orelse is not None:
                _open_else(b)
                sys.call_tracing(exec, (b.info.compiled_else(), frame.f_globals, dict(frame.f_locals)))
                b.block.__exit__(None, None, None)
            BRANCHES.remove(b)
    return True


def _open_else(b):
    b.block = b.block.else_()
    b.block.__enter__()
    b.phase = _ELSE
    b.lo, b.hi = b.info.orelse


def _abort_frame(frame):
    """An exception leaves the branches of `frame`: they close where they are (their
    else parts are not recorded) and the frame is no longer traced."""
    while True:
        b = _top(frame)
        if b is None:
            break
        BRANCHES.remove(b)
        try:
            b.block.__exit__(None, None, None)
        except BaseException:
            pass
    _release(frame)


def finish(owner, failed):
    """The trace or session `owner` exits: its branches still open are closed (with an
    error if one's else part was never recorded) and their frames no longer traced."""
    mine = [b for b in BRANCHES if b.owner is owner]
    if not mine:
        return
    for b in mine:
        BRANCHES.remove(b)
    for b in mine:
        if not any(other.frame is b.frame for other in BRANCHES):
            _release(b.frame)
    if failed:
        return
    pending = None
    for b in reversed(mine):
        b.block.__exit__(None, None, None)
        if b.phase == _BODY and b.info.orelse is not None:
            pending = b
    if pending is not None:
        raise _C.InterventionError(
            f"the `else` part of the `if` statement at {pending.info.where} was never recorded (another tool "
            "took over Python's trace function?): use `with tracer.cond(condition) as branch:` / "
            "`with branch.else_():`"
        )


# -- for x in proxy ---------------------------------------------------------------------------------


_NOT_A_FOR = (
    "a proxy cannot be iterated while it is being recorded: `for x in proxy:` at session level "
    "(`with model.session():`, outside any trace) records a loop; elsewhere index it (`proxy[0]`), "
    "or iterate over the saved value after the trace"
)


def _for_at(frame):
    key = (frame.f_code, frame.f_code.co_filename, frame.f_lasti)
    found = _statements.get(key)
    if found is None:
        found = _find_for(frame)
        _statements[key] = found
    return found


def _find_for(frame):
    ins, pos = _position(frame, ("GET_ITER", "GET_AITER"))
    if ins is None:
        return _NOT_A_FOR
    tree = _tree(frame)
    if tree is None:
        return (
            "the source of this code is not available (code run from a string?), so its `for` loop cannot be "
            "recorded: use `with session.iter(collection) as item:`"
        )
    node = _innermost(tree, pos, lambda n: isinstance(n, (ast.For, *_COMPREHENSIONS)) and _span(n) == pos)
    if node is None:
        return _NOT_A_FOR
    if not isinstance(node, ast.For):
        return (
            "a comprehension over a proxy cannot be recorded: write a `for` loop at session level "
            "(appending to an `nnsight.list()`), or use `with session.iter(collection) as item:`"
        )
    bad = _leaving(node.body)
    if bad is not None:
        return (
            f"`{bad}` inside `for x in proxy:` cannot be recorded: the loop body is recorded once, now, and "
            "runs for every item when the session runs; use `session.stop()` (inside `if proxy:`) to leave "
            "the loop then"
        )
    return node


class _LoopIterator:
    """Gives the loop variable once; the loop closes when Python asks for more."""

    __slots__ = ("loop", "item")

    def __init__(self, loop, item):
        self.loop = loop
        self.item = item

    def __iter__(self):
        return self

    def __next__(self):
        item = self.item
        if item is not None:
            self.item = None
            return item
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.__exit__(None, None, None)
        raise StopIteration


def loop(proxy, frame):
    """``for x in proxy:`` in `frame`: a loop of the open session."""
    found = _for_at(frame)
    if type(found) is str:
        raise _C.InterventionError(found)
    blocks = OPEN.get()
    owner = blocks[-1] if blocks else None
    if owner is None or not hasattr(owner, "iter"):
        if owner is not None:
            raise _C.InterventionError(
                "`for x in proxy:` inside a trace cannot be recorded (the trace runs the model once): loop at "
                "session level (`with model.session():`, the trace inside the loop), or index the proxy"
            )
        raise _C.InterventionError(
            "this proxy belongs to a trace that is no longer being recorded (its `with` block failed?)"
        )
    block = owner.iter(proxy)
    item = block.__enter__()
    return _LoopIterator(block, item)
