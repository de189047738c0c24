"""`metalm.cli.main`: what every command shares. A bad config file, a missing one or a
malformed override is one line on stderr and exit 2 for each command; a NUL byte in an
argument too; a reader that stops early ends the command quietly (SIGPIPE's status)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from run_tools import assert_one_line_error

from metalm.cli import main


def test_bad_config_file_is_one_line_error(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {steps: 3\n", encoding="utf-8")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  lr: fast\n", encoding="utf-8")
    for argv, fragments in (
        (["-c", str(broken)], ["broken.yaml", "not a valid YAML file"]),
        (["-c", str(wrong)], ["train.lr", "expected float"]),
        (["-c", str(tmp_path / "absent.yaml")], ["absent.yaml", "no such config file"]),
        (["bogus_override"], ["bogus_override", "key.sub=value"]),
    ):
        for command in ("train", "eval", "sample", "demo"):
            assert main(["-q", command, *argv, f"output_dir={tmp_path / 'runs'}"]) == 2
            assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "runs").exists()


def test_an_argument_with_a_nul_byte_is_a_one_line_error(capsys):
    assert main(["-q", "sample", "-c", "\x00"]) == 2  # found by the CLI fuzzer
    assert capsys.readouterr().err == "error: an argument contains a NUL byte; remove it\n"


@pytest.mark.slow
def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`metalm sample | head -1`-like: the reader has gone before the output is written;
    no error message, the status of a process stopped by SIGPIPE."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "metalm.cli", "-q", "sample", "--index", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader stops at once
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert stderr == ""
