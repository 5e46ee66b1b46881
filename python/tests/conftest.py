"""The suite tests the installed wheel, never the source tree: a source import would miss
the native module's real build and the wheel's contents."""

import os

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
