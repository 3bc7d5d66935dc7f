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
