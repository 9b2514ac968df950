"""Which checkpoint a learner worker restores (learner/worker.py `restore_point`): only the one the driver
chose, or a newer complete one this run wrote (a worker restarted by Ray Train) -- never a `.tmp` folder,
never a newer checkpoint the driver skipped as corrupt when it is older than the chosen one."""

from pathlib import Path

from learner.sharded_state import LEARNER_META
from learner.worker import restore_point


def _ckpt(root: Path, version: int, *, complete: bool = True) -> Path:
    path = root / (f"step_{version:06d}" + ("" if complete else ".tmp"))
    path.mkdir(parents=True)
    (path / LEARNER_META).write_text("{}")
    return path


def test_a_fresh_run_restores_only_what_it_wrote(tmp_path):
    assert restore_point(tmp_path, None) is None
    _ckpt(tmp_path, 3, complete=False)
    assert restore_point(tmp_path, None) is None  # a .tmp is never restored
    newer = _ckpt(tmp_path, 2)
    assert restore_point(tmp_path, None) == newer  # this run's own (a Ray Train restart)


def test_a_resumed_run_restores_the_chosen_one_or_a_newer_one_it_wrote(tmp_path):
    chosen = _ckpt(tmp_path, 4)
    _ckpt(tmp_path, 6, complete=False)
    assert restore_point(tmp_path, str(chosen)) == chosen
    later = _ckpt(tmp_path, 8)
    assert restore_point(tmp_path, str(chosen)) == later


def test_checkpoints_newer_than_the_resumed_one_are_set_aside(tmp_path):
    """The driver resumed from step_4 because step_8 was unreadable: step_8 is renamed, so a worker that
    Ray Train restarts takes step_4 (or what this run writes after), never the corrupt one."""
    from perception_r1.run_checkpoints import set_aside_newer

    chosen, corrupt = _ckpt(tmp_path, 4), _ckpt(tmp_path, 8)
    assert set_aside_newer(tmp_path, chosen) == [corrupt]
    assert (tmp_path / "step_000008.unreadable").is_dir() and restore_point(tmp_path, str(chosen)) == chosen
