"""The bootstrap of `runlens record`: Python's site module imports it at start-up.

`runlens record` puts this file's folder first on the program's PYTHONPATH and passes its
settings in environment variables that start with RUNLENS_RECORD_. This file then:

1. removes those variables from os.environ and this folder from PYTHONPATH and sys.path,
   so that the processes the program starts (DataLoader workers, subprocesses) run
   without runlens;
2. starts `runlens.recorder.auto`, which installs its hooks when the program imports
   torch. If that fails, it writes one warning line to stderr and the program runs
   without recording;
3. runs the sitecustomize module that Python would have imported without runlens, if
   there is one on the path.

Only the standard library is imported before step 2, so a program whose Python cannot
import runlens still runs.
"""

import importlib.machinery
import importlib.util
import os
import sys

_ENV_PREFIX = "RUNLENS_RECORD_"
_FOLDER = os.path.dirname(os.path.realpath(__file__))


def _is_this_folder(entry):
    return os.path.realpath(entry or os.curdir) == _FOLDER


def _restore_pythonpath():
    """Remove this folder from the front of PYTHONPATH, where `runlens record` put it.

    `runlens record` sets PYTHONPATH to this folder alone when it was unset, and to this
    folder, a separator and the old value otherwise (an empty old value included).
    """
    value = os.environ.get("PYTHONPATH")
    if value is None:
        return
    first, separator, rest = value.partition(os.pathsep)
    if not _is_this_folder(first):
        return
    if separator:
        os.environ["PYTHONPATH"] = rest
    else:
        del os.environ["PYTHONPATH"]


def _take_settings():
    """Remove runlens's variables from os.environ and return them."""
    return {name: os.environ.pop(name) for name in list(os.environ)
            if name.startswith(_ENV_PREFIX)}


def _start_recording(variables):
    if not variables:
        return
    try:
        from runlens.recorder import auto

        auto.start(variables)
    except Exception as error:  # noqa: BLE001 - the program must run without recording
        message = " ".join(f"{type(error).__name__}: {error}".split())
        sys.stderr.write(f"runlens: warning: recording is off: runlens did not start in "
                         f"this Python ({message}). The program runs without it.\n")
        sys.stderr.flush()


def _run_previous_sitecustomize():
    """Import the sitecustomize module that this file hides, as Python would have.

    An error in it propagates to the site module, which reports it as it would without
    runlens.
    """
    path = [entry for entry in sys.path if not _is_this_folder(entry)]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


# The guard keeps a tool that imports every module of the runlens package from running it.
if __name__ == "sitecustomize":
    _restore_pythonpath()
    sys.path[:] = [entry for entry in sys.path if not _is_this_folder(entry)]
    _start_recording(_take_settings())
    _run_previous_sitecustomize()
