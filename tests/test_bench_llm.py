"""bench_llm's measurements: a command's peak RSS is its own, whatever the size of the process that runs it."""

from __future__ import annotations

import sys

from bench.bench_llm import run_measured

MIB = 1 << 20


def _python(code: str) -> list[str]:
    return [sys.executable, "-S", "-c", code]


def test_peak_rss_is_the_commands_own_not_its_parents():
    ballast = b"\x01" * (256 * MIB)  # every page written: this process is now over 256 MiB resident
    idle_seconds, idle, idle_code = run_measured(_python("pass"))
    seconds, peak, code = run_measured(_python(f"import time; x = b'\\x01' * ({64 * MIB}); time.sleep(0.2)"))
    del ballast
    assert (idle_code, code) == (0, 0)
    assert idle < 32 * MIB  # a bare interpreter (plus the few MB its launcher passes on), not the ballast
    # the 64 MiB the child wrote, on top of the interpreter alone; nothing of this process's 256 MiB
    assert 64 * MIB <= peak <= idle + 72 * MIB
    assert seconds >= 0.2 > idle_seconds - 1


def test_exit_code_and_output_of_the_command(tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "w") as handle:
        _, _, code = run_measured(_python("import sys; print('written'); sys.exit(3)"), stdout=handle)
    assert code == 3
    assert out.read_text() == "written\n"
    assert run_measured(["/nonexistent/command"])[2] == 127
