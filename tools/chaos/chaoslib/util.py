"""util — small helpers shared by the chaos modules: durations, logging, the batonlib import.

batonlib (tests/lib/batonlib.py) is imported by path: from BATON_CHAOS_BATONLIB if set, else from
lib/ next to this tool (where `cmake --install` puts a copy: <prefix>/share/baton/chaos/lib), else
from the repository this tool lives in, so the tool runs installed and from a plain checkout
without PYTHONPATH.
"""

import importlib.util
import os
import re
import sys
import threading
import time

_T0 = time.monotonic()
_log_lock = threading.Lock()
_quiet = {"on": False}


def set_quiet(on):
    _quiet["on"] = bool(on)


def log(msg):
    """A progress line on stderr, prefixed with seconds since the tool started."""
    if _quiet["on"]:
        return
    with _log_lock:
        sys.stderr.write(f"[chaos {time.monotonic() - _T0:7.2f}] {msg}\n")
        sys.stderr.flush()


def tool_dir():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_root():
    return os.path.dirname(os.path.dirname(tool_dir()))


_bl = {}


def batonlib():
    """The batonlib module, loaded once by path."""
    if "m" in _bl:
        return _bl["m"]
    path = os.environ.get("BATON_CHAOS_BATONLIB")
    if not path:
        installed = os.path.join(tool_dir(), "lib", "batonlib.py")
        path = installed if os.path.isfile(installed) else os.path.join(repo_root(), "tests", "lib", "batonlib.py")
    if not os.path.isfile(path):
        raise SystemExit(f"baton chaos: cannot find batonlib.py at {path} (set BATON_CHAOS_BATONLIB)")
    spec = importlib.util.spec_from_file_location("batonlib", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["batonlib"] = mod
    spec.loader.exec_module(mod)
    _bl["m"] = mod
    return mod


_DUR_RX = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|min)?\s*$")


def seconds(value, what="duration"):
    """'2s', '500ms', '1.5', '1m', 3 -> seconds as a float. None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = _DUR_RX.match(str(value))
    if not m:
        raise ValueError(f"{what}: bad duration {value!r} (use e.g. 2s, 500ms, 1m)")
    n = float(m.group(1))
    unit = m.group(2) or "s"
    return n / 1000.0 if unit == "ms" else n * 60.0 if unit in ("m", "min") else n


def fmt_s(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f} s"
