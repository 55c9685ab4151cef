"""Fixtures shared by the test modules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from a2q_passes.cli import main


@pytest.fixture
def a2q(capsys, monkeypatch):
    """The real ``a2q`` entry point (``main``), in-process: a subprocess per call pays seconds of imports,
    and monkeypatched readers are the ones it uses. Returns ``run(*args)`` -> returncode/stdout/stderr.
    """

    def run(*args):
        monkeypatch.setattr("sys.argv", ["a2q", *map(str, args)])
        capsys.readouterr()  # drop what the test printed before
        with pytest.raises(SystemExit) as stop:
            main()
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=stop.value.code or 0, stdout=captured.out, stderr=captured.err)

    return run
