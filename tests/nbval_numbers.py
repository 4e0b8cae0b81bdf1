"""Notebook outputs compared up to floating-point noise: a pytest plugin for nbval (see the root conftest.py).

The notebooks are executed with fixed seeds and threads and with pinned CPU code
paths (the Makefile's notebook numerics: ATen's and oneDNN's AVX2 kernels, MKL's
vendor-neutral COMPATIBLE branch; nbs/00_conventions.ipynb, "Seeds and threads"), so that
they print the same characters on any x86-64 CPU.  Should some kernel still add a sum
in another order on another machine, a loss printed to six digits changes in its last
digit and a norm printed as 4.5e-08 becomes 3.0e-08; nbval, comparing characters,
would fail the cell although nothing the book says has changed.

`texts_agree` keeps the text exact and lets only the numbers move, by a little:
the words, the layout and the count of numbers must match; each number must equal the
stored one within `relative` of its size or `last_places` units of its last printed
digit, whichever is larger; numbers both below `negligible` in size (printed rounding
errors such as 3e-08) always agree.  The cells' own asserts still check every claim.
"""
from __future__ import annotations

import re

NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")

RELATIVE = 0.02
LAST_PLACES = 3
NEGLIGIBLE = 1e-6


def last_place(number: str) -> float:
    """The value of one unit in the last printed digit: '3.735' -> 0.001, '4.5e-08' -> 1e-09, '75' -> 1."""
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def numbers_agree(stored: str, fresh: str, *, relative: float = RELATIVE, last_places: int = LAST_PLACES,
                  negligible: float = NEGLIGIBLE) -> bool:
    """Whether two printed numbers differ by no more than floating-point noise (see the module docstring)."""
    if stored == fresh:
        return True
    a, b = float(stored), float(fresh)
    size = max(abs(a), abs(b))
    if size < negligible:
        return True
    allowed = max(relative * size, last_places * max(last_place(stored), last_place(fresh)))
    return abs(a - b) <= allowed


def texts_agree(stored: str, fresh: str, **tolerances) -> bool:
    """Whether two outputs are the same text up to numbers that agree by `numbers_agree`."""
    if stored == fresh:
        return True
    if NUMBER.split(stored) != NUMBER.split(fresh):
        return False
    return all(numbers_agree(a, b, **tolerances) for a, b in zip(NUMBER.findall(stored), NUMBER.findall(fresh)))


def outputs_by_key(item, outputs, skip) -> dict[str, list]:
    """A cell's outputs flattened the way nbval compares them: MIME type or stream name -> sanitized values."""
    from nbval.plugin import transform_streams_for_comparison

    flat: dict[str, list] = {}
    for output in transform_streams_for_comparison(outputs):
        for key, value in output.items():
            if key in skip:
                continue
            entries = value.items() if key == "data" else [(key, value)]
            for name, text in entries:
                if name not in skip:
                    flat.setdefault(name, []).append(item.sanitize(text))
    return flat


def install(nbval_plugin) -> None:
    """Make nbval's cell comparison fall back to `texts_agree` when the characters differ."""
    cell_item = nbval_plugin.IPyNbCell
    if getattr(cell_item.compare_outputs, "numeric_tolerance", False):
        return
    exact = cell_item.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        if exact(self, test, ref, skip_compare):
            return True
        skip = skip_compare or self.parent.skip_compare
        fresh, stored = outputs_by_key(self, test, skip), outputs_by_key(self, ref, skip)
        if fresh.keys() != stored.keys() or any(len(fresh[k]) != len(stored[k]) for k in stored):
            return False
        for key in stored:
            for a, b in zip(stored[key], fresh[key]):
                if a != b and not (isinstance(a, str) and isinstance(b, str) and texts_agree(a, b)):
                    return False
        self.comparison_traceback = []
        return True

    compare_outputs.numeric_tolerance = True
    cell_item.compare_outputs = compare_outputs


def pytest_configure(config):
    """Installed as a pytest plugin (the root conftest.py's `pytest_plugins`, or `-p nbval_numbers`)."""
    if config.pluginmanager.hasplugin("nbval"):
        import nbval.plugin

        install(nbval.plugin)
