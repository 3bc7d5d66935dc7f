"""Provenance of experiment results: commit, local changes, machine load."""

import re
import subprocess

from experiments import provenance


def test_git_commit_is_head_and_lists_changed_tracked_files(tmp_path, monkeypatch):
    commit, dirty = provenance.git_commit()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.REPO, capture_output=True)
    assert commit == head.stdout.decode().strip() and re.fullmatch(r"[0-9a-f]{40}", commit)
    assert isinstance(dirty, list) and all(isinstance(path, str) and path for path in dirty)
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # not a git checkout
    assert provenance.git_commit() == (None, None)


def test_loadavg_is_three_non_negative_numbers():
    load = provenance.loadavg()
    assert load is not None and len(load) == 3 and all(x >= 0 for x in load)


def test_begin_records_the_code_at_the_start_and_end_adds_the_load():
    record = provenance.begin()
    assert record["commit"] == provenance.git_commit()[0] and "loadavg_end" not in record
    final = provenance.end(record)
    assert final["commit"] == record["commit"] and len(final["loadavg_end"]) == 3
    line = provenance.run_line("python -m x --flag ", 12.4, {**final, "dirty": ["a.py"]})
    assert line.startswith("Command: `python -m x --flag` at commit " + record["commit"][:12])
    assert "(with local changes to a.py)" in line and "total wall time 12 s" in line
    assert provenance.run_line("x", 1.0, {**final, "dirty": []}).count("local changes") == 0
