"""A study's driver stops alike on SIGINT, SIGTERM and SIGHUP (tests/integration/test_interrupts.py sends
SIGINT and SIGHUP to running studies), and puts the previous handlers back."""

from __future__ import annotations

import os
import signal

import pytest

from study import runner

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def test_sigint_sigterm_and_sighup_share_one_handler_and_are_restored():
    before = {s: signal.getsignal(s) for s in SIGNALS}
    with runner.stop_signals() as received:
        handlers = {signal.getsignal(s) for s in SIGNALS}
        assert len(handlers) == 1 and callable(next(iter(handlers)))
        with pytest.raises(KeyboardInterrupt):  # no Tune running: interrupts at once
            os.kill(os.getpid(), signal.SIGHUP)  # Python runs the handler before os.kill returns
        assert received == [signal.SIGHUP]
    assert {s: signal.getsignal(s) for s in SIGNALS} == before
    assert runner.main_guard(lambda: (_ for _ in ()).throw(runner.Interrupted(signal.SIGHUP))) == 129


def test_a_search_tune_ended_short_is_one_line_and_exit_1(capsys):
    code = runner.main_guard(lambda: (_ for _ in ()).throw(runner.Incomplete("Ray Tune ended the search with 1 of its 6 trials")))
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: Ray Tune ended") and "\n" not in err
