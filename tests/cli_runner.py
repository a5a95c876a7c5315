"""A fork server for tests that run `python main.py ARGS` only to see a bad input rejected.

A real `python main.py` spends ~6 s importing torch, diffusers and accelerate before a bad config is refused in
under 0.1 s. Here one helper process (per environment and working directory, started on first use) imports those
modules once and then, for every request, forks a child that runs the script exactly as the interpreter would:

- argv: sys.argv = [script, *args] and sys.orig_argv as given, sys.path[0] = the script's directory, a fresh
  `__main__` module (the script's code compiled under its absolute path, as `python script` does);
- cwd and environment: chdir to the request's cwd, os.environ (and so the C environment) replaced by the
  request's env before the script runs; the helper itself was started with that same env and cwd, so anything read
  at import time (HF_HUB_OFFLINE, HF_HUB_CACHE, OMP_NUM_THREADS, ALIGNPROP_CACHE, WANDB_MODE, PYTHONPATH, ...) is
  what a plain subprocess would have read: a request whose env or cwd differs gets a helper of its own;
- output: fds 1 and 2 are pipes read by the helper, so print, logging, warnings, absl and C-level writes are all
  captured; fd 0 is /dev/null (what pytest gives a subprocess);
- exit: SystemExit's code as the interpreter maps it (None -> 0, an int -> itself, anything else printed -> 1), an
  uncaught exception -> sys.excepthook with the traceback starting at the script's frame, exit 1 (KeyboardInterrupt:
  killed by SIGINT); then non-daemon threads are joined, atexit callbacks run and stdout/stderr flushed, as at the
  end of a real interpreter.

What differs from a real process: the preloaded modules are already imported when the script starts (the helper
refuses to serve, and `run` falls back to a real subprocess, when those imports wrote any output, started a second
thread or initialised CUDA, i.e. whenever preloading could be visible); children share the helper's str-hash seed
(a real process draws a new one); the parent process is the helper, not pytest. The global RNGs are reseeded in
every child (`random` does it itself after a fork; numpy's legacy global generator here).

The helper never runs a script itself: each child starts from the state right after the imports.
Set ALIGNPROP_TEST_NO_FORK=1 to run every request in a real subprocess instead.
"""

from __future__ import annotations

import atexit
import base64
import collections
import importlib
import io
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"
# Set by pytest per test: its value never matters at import time, so it does not need a helper of its own.
VOLATILE = ("PYTEST_CURRENT_TEST",)
MAX_SERVERS = 2  # helpers alive at once (the least recently used one ends)
# What `python main.py` imports anyway before a config is refused by jobs.run_job (alignprop/cli.py run_config),
# then the reward modules its validation imports on the first reward lookup (open_clip, timm, wandb: ~1.5 s more).
PRELOAD = ("alignprop.cli", "accelerate", "alignprop.jobs", "alignprop.rewards.registry")


def preload_names(done: str) -> tuple[str, ...]:
    """The modules to import after `done`: the registry's reward modules (none if alignprop renames the list)."""
    if done == "alignprop.rewards.registry":
        return tuple(getattr(sys.modules[done], "REWARD_MODULES", ()))
    return ()


# --- the helper process ---------------------------------------------------------------------------------------


def exit_status(code) -> int:
    """The process exit status for SystemExit(code), as the interpreter works it out (printing a non-int code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def script_traceback(tb, path: str):
    """The traceback from the script's own frame on (what the interpreter prints), None when it never ran."""
    while tb is not None and tb.tb_frame.f_code.co_filename != path:
        tb = tb.tb_next
    return tb


def finish(status: int, interrupted: bool = False):
    """The end of a real interpreter: join non-daemon threads, run atexit callbacks, flush stdio, exit."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the interpreter exits 120 when it cannot flush stdout (stderr: ignored)
            status = 120 if stream is sys.stdout else status
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def run_script(request: dict):
    """In the forked child: become `python ARGV` in CWD with ENV, run the script and exit; never returns."""
    import builtins
    import importlib.machinery
    import types

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    path = os.path.abspath(argv[0])
    sys.argv = list(argv)
    sys.orig_argv = [sys.executable, *argv]
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    if "numpy" in sys.modules:  # a real process seeds numpy's global generator from OS entropy at import
        sys.modules["numpy"].random.seed()
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __file__=path,
        __cached__=None,
        __builtins__=builtins,
        __annotations__={},
        __loader__=importlib.machinery.SourceFileLoader("__main__", path),
    )
    sys.modules["__main__"] = main
    status, interrupted = 0, False
    try:
        with open(path, "rb") as file:
            source = file.read()
        exec(compile(source, path, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as error:
        status = exit_status(error.code)
    except BaseException as error:
        error.__traceback__ = script_traceback(error.__traceback__, path)  # what the interpreter shows
        sys.excepthook(type(error), error, error.__traceback__)
        status, interrupted = 1, isinstance(error, KeyboardInterrupt)
    finish(status, interrupted)


def serve_one(request: dict) -> dict:
    """Fork a child for `request`, collect its output until it exits (or its timeout), and reply."""
    cli = sys.modules.get("alignprop.cli")
    assert cli is None or not cli.FLAGS.is_parsed(), "the helper must never parse flags or run main itself"
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(out_r)
            os.close(err_r)
            os.close(PROTOCOL_IN)
            os.close(PROTOCOL_OUT)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.close(out_w)
            os.close(err_w)
            run_script(request)
        except BaseException:  # the runner itself failed (run_script never returns)
            import traceback

            traceback.print_exc()
        finally:
            os._exit(70)
    os.close(out_w)
    os.close(err_w)
    timeout = request.get("timeout")
    deadline = None if timeout is None else time.monotonic() + timeout
    output = {out_r: bytearray(), err_r: bytearray()}
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for fd in output:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                if not timed_out:
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + 5  # then whatever is left in the pipes, as subprocess.run
                    continue
                break
            for key, _ in selector.select(wait):
                data = os.read(key.fd, 65536)
                if data:
                    output[key.fd] += data
                else:
                    selector.unregister(key.fd)
    os.close(out_r)
    os.close(err_r)
    if timed_out:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, wait_status = os.waitpid(pid, 0)
    encode = lambda data: base64.b64encode(bytes(data)).decode("ascii")
    return {
        "returncode": os.waitstatus_to_exitcode(wait_status),
        "stdout": encode(output[out_r]),
        "stderr": encode(output[err_r]),
        "timed_out": timed_out,
    }


def native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def serve() -> None:
    """The helper's main loop: preload, say whether forking is faithful, then one JSON line per request."""
    global PROTOCOL_IN, PROTOCOL_OUT
    PROTOCOL_IN, PROTOCOL_OUT = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # stray output goes to the helper's log, never into the replies
    os.close(null)
    sys.path[0] = str(ROOT)  # as for `python main.py`, not this file's directory
    problems, names = [], list(PRELOAD)
    while names and not problems:
        name = names.pop(0)
        try:
            importlib.import_module(name)
        except BaseException as error:  # a real process would fail later, with its own traceback
            problems.append(f"importing {name} failed: {type(error).__name__}: {error}")
        else:
            names += preload_names(name)
    sys.stdout.flush()
    sys.stderr.flush()
    threads = native_threads()
    if threads != 1:
        problems.append(f"the preloaded imports started {threads - 1} thread(s)")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        problems.append("the preloaded imports initialised CUDA")
    replies = os.fdopen(PROTOCOL_OUT, "w", closefd=False)
    replies.write(json.dumps({"ready": True, "problems": problems}) + "\n")
    replies.flush()
    for line in os.fdopen(PROTOCOL_IN, "r", closefd=False):
        replies.write(json.dumps(serve_one(json.loads(line))) + "\n")
        replies.flush()


# --- the client (in the pytest process) -----------------------------------------------------------------------


class ForkServer:
    """One helper process, started with `env` in `cwd`."""

    def __init__(self, env: dict, cwd: str):
        self.log = tempfile.TemporaryFile()
        self.lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        hello = self.process.stdout.readline()
        if not hello:
            raise RuntimeError(f"the fork server did not start:\n{self.output()}")
        problems = json.loads(hello)["problems"]
        written = self.output()
        if written:
            problems.append(f"the preloaded imports wrote output a real process would show: {written[:500]!r}")
        self.problem = "; ".join(problems)
        if self.problem:
            warnings.warn(f"fork server not used, running real subprocesses instead: {self.problem}", stacklevel=2)
            self.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def run(self, argv: list[str], cwd: str, env: dict, timeout: float | None) -> subprocess.CompletedProcess:
        request = {"argv": argv, "cwd": cwd, "env": env, "timeout": timeout}
        with self.lock:
            try:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
                reply = self.process.stdout.readline()
            except BaseException:  # e.g. a test timeout: its reply would answer the next request
                self.close(kill=True)
                raise
        if not reply:
            raise RuntimeError(f"the fork server died:\n{self.output()}")
        reply = json.loads(reply)
        stdout, stderr = (base64.b64decode(reply[name]) for name in ("stdout", "stderr"))
        args = [sys.executable, *argv]
        if reply["timed_out"]:  # with the output so far in bytes, as subprocess.run raises it
            raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(args, reply["returncode"], decode(stdout), decode(stderr))

    def alive(self) -> bool:
        return self.process.poll() is None and not self.process.stdin.closed

    def close(self, kill: bool = False) -> None:
        """End the helper: it exits at the end of its input (at once with `kill`)."""
        if self.process.poll() is None and not self.process.stdin.closed:
            if kill:
                self.process.kill()
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.log.close()


def decode(data: bytes) -> str:
    """Bytes to text exactly as subprocess.run(text=True) does it (locale encoding, universal newlines)."""
    encoding = io.TextIOWrapper(io.BytesIO()).encoding
    return data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


SERVERS: collections.OrderedDict[tuple, ForkServer] = collections.OrderedDict()


@atexit.register
def close_servers() -> None:
    while SERVERS:
        SERVERS.popitem()[1].close()


def server_for(env: dict, cwd: str) -> ForkServer:
    key = (cwd, tuple(sorted((name, "" if name in VOLATILE else value) for name, value in env.items())))
    server = SERVERS.get(key)
    if server is None or not (server.problem or server.alive()):  # one with a problem has warned: keep it
        if server is not None:
            server.close()
        SERVERS[key] = ForkServer(env, cwd)
        while len(SERVERS) > MAX_SERVERS:
            SERVERS.popitem(last=False)[1].close()
    SERVERS.move_to_end(key)
    return SERVERS[key]


def run(argv, *, cwd=ROOT, env=None, timeout=None) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`,
    answered by a child forked from a helper that has the heavy modules imported already."""
    argv = [os.fspath(arg) for arg in argv]
    cwd = os.fspath(cwd)
    env = dict(os.environ if env is None else env)
    if os.environ.get("ALIGNPROP_TEST_NO_FORK") != "1" and hasattr(os, "fork"):
        server = server_for(env, cwd)
        if not server.problem:
            return server.run(argv, cwd, env, timeout)
    command = [sys.executable, *argv]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_main(*args, cwd=ROOT, env=None, timeout=None) -> subprocess.CompletedProcess:
    """`python main.py ARGS` through the fork server."""
    return run([str(MAIN), *args], cwd=cwd, env=env, timeout=timeout)


PROTOCOL_IN = PROTOCOL_OUT = -1

if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
