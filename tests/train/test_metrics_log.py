"""The console progress: tqdm's bar on a terminal, plain log lines elsewhere."""

import io
import logging
import re
import time

from hybridjax.metrics_log import Progress

METER = r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+step/s, loss=0\.1667\]"  # elapsed<ETA, rate, loss


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def steps(progress: Progress, *, logged_every: int = 1) -> None:
    """Steps 3..6 of 6 (resumed at 2), a few ms each, the loss 1/step."""
    for step in range(3, 7):
        time.sleep(0.005)
        progress.update(step, 1 / step, logged=step % logged_every == 0, final=step == 6)


def test_a_terminal_gets_a_tqdm_bar_with_rate_eta_and_loss():
    out = Terminal()
    before = list(logging.root.handlers)
    steps(Progress(6, start=2, stream=out))
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n")  # redrawn in place; closed at the end
    assert re.search(r"6/6 " + METER, text.rsplit("\r", 1)[-1])
    assert logging.root.handlers == before  # tqdm's logging redirect ended with the bar


def test_elsewhere_each_logged_step_is_a_log_line_without_a_bar(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="hybridjax.train"):
        steps(Progress(6, start=2, stream=out), logged_every=2)
    assert out.getvalue() == ""  # no carriage-return redraws in a log file
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["step 4/6", "step 6/6"]
    assert re.fullmatch(r"step 6/6 \(100%\) " + METER, lines[-1])
