from actors.busy import BusyClock


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_overlapping_calls_count_once_and_idle_time_not_at_all():
    now = FakeTime()
    clock = BusyClock(now)
    clock.enter()          # t=0: call A
    now.t = 2.0
    clock.enter()          # t=2: call B beside it
    now.t = 5.0
    clock.leave()          # t=5: A ends, B still runs
    now.t = 6.0
    clock.leave()          # t=6: B ends: busy 0..6
    now.t = 10.0           # idle 6..10
    clock.enter()
    now.t = 11.0
    clock.leave()          # busy 10..11
    assert clock.take() == 7.0
    assert clock.take() == 0.0


def test_a_stretch_running_across_a_take_is_split_between_periods():
    now = FakeTime()
    clock = BusyClock(now)
    now.t = 1.0
    clock.enter()
    now.t = 4.0
    assert clock.take() == 3.0  # counted up to the take
    now.t = 9.0
    clock.leave()
    assert clock.take() == 5.0  # the rest, not counted twice
