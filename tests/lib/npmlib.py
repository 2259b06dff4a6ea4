"""npmlib — a pinned npm package for the tests, installed once into a cache directory.

Standard library only, on top of batonlib. ensure_package() returns a directory whose
node_modules/ holds exactly the pinned version: the cached copy while its version matches, else
a fresh `npm install` into a temporary directory beside it, renamed into place when complete (so
two runs at once never see half an install). The cache is $XDG_CACHE_HOME/baton/<name> (or
~/.cache/baton/<name>); without either, a directory beside the baton binary. When node or npm is
missing or the registry cannot be reached, it raises AssertionError: a test that needs the
package fails, it never passes without running.
"""

import json
import os
import shutil
import subprocess

import batonlib as bl


def cache_dir(name):
    """The cache directory `name` (which need not exist yet)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base and os.environ.get("HOME"):
        base = os.path.join(os.environ["HOME"], ".cache")
    if base:
        try:
            os.makedirs(os.path.join(base, "baton"), exist_ok=True)
            return os.path.join(base, "baton", name)
        except OSError:
            pass
    return os.path.join(os.path.dirname(bl.baton_bin()), "compat-node", name)


def installed_version(d, pkg):
    """The version of pkg installed under d/node_modules, or None."""
    try:
        with open(os.path.join(d, "node_modules", *pkg.split("/"), "package.json")) as f:
            return json.load(f).get("version")
    except (OSError, ValueError):
        return None


def ensure_package(pkg, version, name, timeout=180, check=None):
    """Returns the cache directory `name`, whose node_modules/ holds pkg@version.

    check(d), if given, is a further test that an install in d is usable (e.g. that an entry
    point exists); a copy that fails it is installed again."""
    for tool in ("node", "npm"):
        if not shutil.which(tool):
            raise AssertionError(f"`{tool}` is not on the PATH; scripts/setup installs Node.js and npm")

    def ok(d):
        return installed_version(d, pkg) == version and (check is None or check(d))

    d = cache_dir(name)
    if ok(d):
        return d
    tmp = f"{d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "package.json"), "w") as f:
        json.dump({"name": "baton-test-deps", "private": True, "version": "0.0.0"}, f)
    cmd = ["npm", "install", "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error",
           "--fetch-retries=1", "--fetch-timeout=60000", f"{pkg}@{version}"]
    try:
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssertionError(f"`{' '.join(cmd)}` did not finish within {timeout} s: is the npm registry reachable?")
    if r.returncode != 0 or not ok(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssertionError(f"could not install {pkg}@{version} from the npm registry (exit {r.returncode}); "
                             f"the test cannot run without it.\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    shutil.rmtree(d, ignore_errors=True)
    try:
        os.rename(tmp, d)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok(d):
            raise AssertionError(f"could not place {pkg}@{version} in {d}")
    return d


def node_workdir(parent, name, script, pkg_dir):
    """A private directory parent/name holding a copy of script beside a link to pkg_dir's
    node_modules, so that the script's imports resolve to the pinned package and nothing is
    written to the cache. Returns its path."""
    work = os.path.join(parent, name)
    os.makedirs(work)
    shutil.copy(script, work)
    os.symlink(os.path.join(pkg_dir, "node_modules"), os.path.join(work, "node_modules"))
    return work


def run_node(work, script, env, timeout, what="node client"):
    """Runs `node script` in work. Returns (the JSON object of the last stdout line that starts with
    '{', the completed process); raises AssertionError with the output when node failed, printed no
    such line, or did not finish within timeout seconds."""
    try:
        r = subprocess.run(["node", script], cwd=work, env=env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the {what} did not finish within {timeout} s; stderr: {e.stderr!r}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise AssertionError(f"{what} failed (exit {r.returncode})\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return json.loads(lines[-1]), r
