"""``rlhfkit check``: reports versions and device, fails on a broken import, writes nothing."""
from rlhf_core.train import check


def test_check_reports_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(check, "KIT_MODULES", ("rlhf_core.runformat.run_reader", "profiler.phases"))
    assert check.main([]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out and "device auto" in out and "check: OK" in out
    assert list(tmp_path.iterdir()) == []


def test_check_fails_on_a_broken_import(monkeypatch, capsys):
    monkeypatch.setattr(check, "KIT_MODULES", ("no_such_module_xyz",))
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert "ModuleNotFoundError" in out and "check: FAILED" in out
