"""Loaded at start-up by every Python process of a test cluster's nodes (this folder is on their PYTHONPATH),
when T2V_FILE_AUDIT is set: an audit hook (PEP 578) logs each file the process opens, for writing (W) or reading
(R), to $T2V_FILE_AUDIT/<node>-<pid>.log, so that a test can see whether a file one node wrote was read on
another: a shared-disk assumption that a real cluster would break. A rename counts as a write of its new name
(atomic writes). Python's, Ray's and the system's own folders are left out; files opened by native code alone
(safetensors' weights) are not seen, but a bundle's JSON configs beside them are."""

import os
import sys


def _install() -> None:
    folder, node = os.environ.get("T2V_FILE_AUDIT"), os.environ.get("T2V_NODE")
    if not folder or not node:
        return
    log = open(os.path.join(folder, f"{node}-{os.getpid()}.log"), "a", buffering=1)
    skip = tuple(sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, folder, "/proc", "/sys", "/dev", "/usr",
                         "/etc", "/tmp/ray", os.environ.get("RAY_TMPDIR") or "/tmp/ray"}))
    seen = set()

    def hook(event, args):
        if event in ("os.rename", "os.replace"):  # an atomic write: a temporary name renamed to the real one
            event, (path, mode, flags) = "open", (args[1], "w", 0)
        elif event == "open":
            path, mode, flags = args
        else:
            return
        if path is None or isinstance(path, int):
            return
        try:
            path = os.path.abspath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if path.startswith(skip) or "__pycache__" in path or path.endswith((".py", ".pyc", ".so")):
            return
        write = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        entry = ("W " if write else "R ") + path
        if entry not in seen:
            seen.add(entry)
            log.write(entry + "\n")

    sys.addaudithook(hook)


_install()
