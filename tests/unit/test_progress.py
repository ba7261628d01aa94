"""The study console (study.progress): per-method tallies, the time-left estimate, the lines it prints,
phases and the closing lines — driven with real Ray Tune Trial objects and a hand-advanced clock."""

from __future__ import annotations

import io
import pickle

import pytest
from ray.tune.experiment import Trial

from study import progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def trial(group: str, trial_id: str) -> Trial:
    return Trial("TrialTrainable", config={"group": group}, trial_id=trial_id, stub=True)


def finish(t: Trial, score: float) -> None:
    t.update_last_result({"objective": score, "training_iteration": 1})
    t.set_status(Trial.TERMINATED)


def watcher(clock: Clock, said: list[str], tty: bool = False, **totals: int) -> progress.Progress:
    return progress.Progress("search", totals, log_file="/s/logs/tune.log", tty=tty, clock=clock, say=said.append)


def test_one_line_per_finished_trial_with_best_left_failed_and_time_left():
    clock, said = Clock(), []
    p = watcher(clock, said, lora=3, read=2)
    lora = [trial("lora|llama-tiny", f"l{i}") for i in range(3)]
    read = [trial("read|llama-tiny", f"r{i}") for i in range(2)]
    trials = [*lora, *read]
    p.on_trial_start(0, trials, lora[0])
    p.on_trial_start(0, trials, lora[1])
    assert said == []  # starts are not printed off a terminal
    clock.now = 10
    finish(lora[0], 0.8123)
    p.on_trial_complete(1, trials, lora[0])
    # lora: mean 10 s, one running (10 s in: 0 left), one queued (10 s); read: 2 queued at the overall mean
    # (20 s); over the 2 slots seen: 15 s
    assert p.eta(p.tally(trials), {"l1": "lora"}) == 15
    assert said == ["search 1/5 done · lora best 0.812 (2 left) · read best – (2 left) · 0 failed · <1 min left"]


@pytest.fixture(autouse=True)
def no_earlier_phase(monkeypatch):
    monkeypatch.setattr(progress, "SECONDS_PER_EPOCH", {})


def test_a_later_phase_guesses_from_the_earlier_phases_seconds_per_epoch():
    clock, said = Clock(), []
    search = watcher(clock, said, full=1, read=1)
    full, read = trial("full|b", "f0"), trial("read|b", "r0")
    for t in (full, read):
        search.on_trial_start(0, [full, read], t)
    clock.now = 4
    read.update_last_result({"objective": 0.7, "training_iteration": 2})  # 2 s an epoch
    read.set_status(Trial.TERMINATED)
    search.on_trial_complete(2, [full, read], read)
    clock.now = 40
    finish(full, 0.8)  # 40 s an epoch
    search.on_trial_complete(1, [full, read], full)
    # confirm: full finished in 120 s here; read has none here yet: 2 s/epoch × 3 epochs, not the mean (120 s)
    confirm = progress.Progress("confirm", {"full": 2, "read": 2}, tty=False, clock=clock, say=said.append,
                                epochs={"full": 3, "read": 3})
    f = [trial("full|b|confirm-s1", "cf0"), trial("full|b|confirm-s2", "cf1")]
    r = [trial("read|b|confirm-s1", "cr0"), trial("read|b|confirm-s2", "cr1")]
    confirm.on_trial_start(0, [*f, *r], f[0])
    # before any confirm trial ends: the earlier phase's pace, 40 s × 3 per full trial and 2 s × 3 per read one
    assert confirm.eta(confirm.tally([*f, *r]), {}) == (2 * 40 * 3 + 2 * 2 * 3) / confirm.slots
    clock.now = 160
    finish(f[0], 0.8)
    confirm.on_trial_complete(3, [*f, *r], f[0])
    assert confirm.eta(confirm.tally([*f, *r]), {}) == 120 + 2 * 2 * 3


def test_time_left_is_at_least_the_longest_running_remainder():
    clock, said = Clock(), []
    p = watcher(clock, said, full=2, probe=2)
    full = [trial("full|b", "f0"), trial("full|b", "f1")]
    probe = [trial("probe|b", "p0"), trial("probe|b", "p1")]
    trials = [*full, *probe]
    for t in (full[0], full[1], probe[0]):
        p.on_trial_start(0, trials, t)
    clock.now = 600
    finish(full[0], 0.9)
    p.on_trial_complete(1, trials, full[0])
    clock.now = 601
    p.on_trial_complete(1, trials, probe[0])
    # full's 600 s trial f1 is 601 s in (0 left), probe's 601 s mean for p1: one slot of three busy for 601 s
    assert p.eta(p.tally(trials), {"f1": "full"}) == pytest.approx(601 / 3)
    p.on_trial_start(2, trials, probe[1])
    clock.now = 700
    assert p.eta(p.tally(trials), {"f1": "full", "p1": "probe"}) == pytest.approx(502)  # p1's remainder
    assert said[-1].endswith("· 0 failed · ~3 min left")  # printed at 601 s: 601 / 3 slots


def test_a_failed_trial_prints_its_reason_and_counts_as_failed():
    clock, said = Clock(), []
    p = watcher(clock, said, lora=2)
    a, b = trial("lora|x", "a"), trial("lora|x", "b")
    p.on_trial_start(0, [a, b], a)
    a.set_status(Trial.ERROR)  # no error file: the reason says where to look
    p.on_trial_error(1, [a, b], a)
    assert said[0] == "search: trial TrialTrainable_a crashed: unknown (see the log) (traceback in /s/logs/tune.log)"
    assert said[1].startswith("search 1/2 done · lora best – (1 left) · 1 failed · ")


def test_an_outcome_the_loop_reported_is_a_failure_with_its_reason():
    clock, said = Clock(), []
    p = watcher(clock, said, full=2)
    a = trial("full|llama-7b", "a")
    p.on_trial_start(0, [a], a)
    a.update_last_result({"objective": -1e9, "status": "oom", "error": "OutOfMemoryError: CUDA out of\n memory"})
    a.set_status(Trial.TERMINATED)
    p.on_trial_complete(1, [a], a)
    assert said == ["search: trial TrialTrainable_a failed (oom): OutOfMemoryError: CUDA out of memory",
                    "search 1/2 done · full best – (1 left) · 1 failed · <1 min left"]


def test_a_resumed_run_counts_what_had_finished():
    clock, said = Clock(), []
    p = watcher(clock, said, read=3)
    old, new = trial("read|x", "o"), trial("read|x", "n")
    finish(old, 0.7)
    p.on_trial_start(0, [old, new], new)
    clock.now = 5
    finish(new, 0.75)
    p.on_trial_complete(1, [old, new], new)
    assert said == ["search 2/3 done · read best 0.750 (1 left) · 0 failed · <1 min left"]


def test_failed_objective_is_not_a_best_score():
    p = watcher(Clock(), [], lora=1)
    t = trial("lora|x", "t")
    finish(t, -1e9)  # the loop's oom / diverged value
    assert p.tally([t])["lora"]["best"] is None


def test_on_a_terminal_one_line_is_redrawn_not_printed(capsys):
    clock, said = Clock(), []
    p = watcher(clock, said, tty=True, lora=1)
    t = trial("lora|x", "t")
    p.on_trial_start(0, [t], t)
    progress.log("a line above the bar")
    clock.now = 3
    finish(t, 0.5)
    p.on_trial_complete(1, [t], t)
    pickle.dumps(p)  # Tune pickles its run config with the callbacks in it: the live bar stays out
    p.on_experiment_end([t])
    assert said == [] and progress._bar is None
    err = capsys.readouterr().err
    assert "a line above the bar" in err and "search 1/1 done · 0 failed · finished · lora best 0.500 (done)" in err


def test_tune_log_writes_rays_own_reporter_output():
    stream = io.StringIO()
    log = progress.TuneLog(stream, "/s/tune")
    t = trial("lora|x", "t")
    log.setup(total_num_samples=1)
    log.on_trial_start(iteration=0, trials=[t], trial=t)
    t.update_last_result({"objective": 0.5, "training_iteration": 1, "time_total_s": 1.0})
    log.on_trial_result(iteration=1, trials=[t], trial=t, result=t.last_result)
    pickle.dumps(log)
    text = stream.getvalue()
    assert "/s/tune" in text and "Trial TrialTrainable_t started with configuration" in text
    assert "Trial TrialTrainable_t result" in text and "objective" in text


def test_phases_and_the_closing_lines(tmp_path, capsys):
    progress.start(str(tmp_path))
    with progress.phase("plan", "2 methods"):
        pass
    with pytest.raises(KeyboardInterrupt), progress.phase("search"):
        raise KeyboardInterrupt
    err = capsys.readouterr().err.splitlines()
    assert f"Ray Tune's per-trial output: {tmp_path}/logs/tune.log" in err[0]
    assert err[1].endswith("plan started: 2 methods") and "plan done in 0s" in err[2]
    assert err[3].endswith("search started") and "search stopped in 0s" in err[4]
    (tmp_path / "trials.parquet").write_bytes(b"")
    lines = progress.where(str(tmp_path), "python -m analysis.report --scaling X").splitlines()
    assert lines == [f"tables:    {tmp_path}/{{trials.parquet}}",
                     f"report:    python -m analysis.report --scaling X -> {tmp_path}/report.html",
                     f"log:       {tmp_path}/logs/tune.log",
                     "wall time: plan 0s · search 0s · total 0s"]


@pytest.mark.parametrize("seconds,text", [(None, "time left: after the first trial"), (30, "<1 min left"),
                                          (540, "~9 min left"), (7200, "~2.0 h left")])
def test_time_left_text(seconds, text):
    assert progress.time_left(seconds) == text
