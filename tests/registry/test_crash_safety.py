import pytest

from deltaplane.registry import Registry
from deltaplane.registry.torture import torture


def test_sigkill_at_random_points_never_corrupts_or_loses_commits(tmp_path):
    report = torture(tmp_path / "h", kills=20, seed=0, size=20_000)
    assert report.ok, report.problems
    assert report.kills == 20
    assert report.committed >= 10  # every other kill waits for a commit: real work happened between kills
    assert report.versions >= report.committed
    assert Registry(tmp_path / "h").verify().ok


@pytest.mark.slow
def test_sigkill_torture_at_scale(tmp_path):
    report = torture(tmp_path / "h", kills=200, seed=1, size=200_000, max_delay_s=0.5)
    assert report.ok, report.problems
