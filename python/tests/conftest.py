"""The suite tests the installed wheel, never the source tree: a source import would miss
the native module's real build and the wheel's contents."""

import os
import threading
import time

import pytest

import msb_vmm


def pytest_report_header(config):
    return "msb_vmm %s from %s" % (msb_vmm.__version__, os.path.dirname(msb_vmm.__file__))


def pytest_configure(config):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.abspath(msb_vmm.__file__).startswith(here + os.sep):
        raise RuntimeError(
            "msb_vmm was imported from the source tree (%s), not an installed wheel: "
            "run the tests through ./x test (or pip install the wheel into a venv)" % msb_vmm.__file__
        )


class Ticker:
    """A Python thread counting while a block runs: proof that a native call blocking the
    main thread left the interpreter to others (about 100 ticks a second when it did)."""

    def __init__(self):
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.is_set():
            self.count += 1
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        time.sleep(0.05)
        self.count = 0
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()



@pytest.fixture
def ticker():
    return Ticker()
