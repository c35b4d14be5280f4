"""Progress lines (dap_ray.progress): share done, rate and time left at this run's own rate."""

import pytest

from dap_ray.progress import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds, text", [
    (None, "?"), (float("nan"), "?"), (0, "0s"), (42.4, "42s"), (249, "4m 09s"), (3600, "1h 00m"), (11_100, "3h 05m"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("total, first, done, elapsed, line", [
    (0, 0, 0, 10, "0/0 iterations (100%), 0 iterations/s, ? left"),
    (400, 0, 0, 0, "0/400 iterations (0%), 0 iterations/s, ? left"),
    (400, 0, 100, 50, "100/400 iterations (25%), 2 iterations/s, 2m 30s left"),
    # A resumed run: the 200 its checkpoint held do not count towards the rate.
    (400, 200, 300, 50, "300/400 iterations (75%), 2 iterations/s, 50s left"),
    (None, 0, 30, 10, "30 iterations, 3 iterations/s"),
    (48, 0, 2, 820, "2/48 trials (4%), 6m 50s per trial, 5h 14m left"),  # slow units: the time each takes
])
def test_progress_lines(total, first, done, elapsed, line):
    clock = Clock()
    progress = Progress(total, "trials" if total == 48 else "iterations", done=first, every_s=20, clock=clock)
    clock.now += elapsed
    assert progress.line(done) == line


def test_lines_are_due_at_a_steady_interval():
    clock = Clock()
    progress = Progress(10, "steps", every_s=20, clock=clock)
    clock.now += 19
    assert not progress.due()
    clock.now += 1
    assert progress.due()
    assert progress.left(5) == "50%, 20s left"  # 5 steps in 20 s, 5 to go
    assert not progress.due()  # the line just printed restarts the interval
    with pytest.raises(ValueError, match="cannot be negative"):
        Progress(-1, "steps")


def test_a_window_follows_a_rate_that_changes():
    clock = Clock()
    whole, window = (Progress(1000, "images", every_s=10, clock=clock, window_s=w) for w in (None, 60))
    # 1 image/s for 120 s (one actor), then 5 images/s for 70 s (the pool grew), a line every 10 s.
    for done in [*range(10, 130, 10), *range(170, 520, 50)]:
        clock.now += 10
        lines = whole.line(done), window.line(done)
    assert lines == ("470/1000 images (47%), 2.47 images/s, 3m 34s left",  # the whole run's rate
                     "470/1000 images (47%), 5 images/s, 1m 46s left")  # the last minute's
    with pytest.raises(ValueError, match="window must be positive"):
        Progress(10, "steps", window_s=0)


def test_mining_knows_its_total_from_folder_shards():
    from dap_ray.steps.mine import _images_to_mine

    folders = [{"start": 0, "stop": 100, "skip": ["a", "b"]}, {"start": 100, "stop": 150}]
    assert _images_to_mine([], 7, None) == 7
    assert _images_to_mine(folders, 10, None) == 158 and _images_to_mine(folders, 10, 50) == 50
    assert _images_to_mine([{"path": "x.tar"}], 0, None) is None  # a tar is counted only as it is read
