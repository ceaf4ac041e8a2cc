"""Provenance as its docstrings promise it (hdkd/infra/provenance.py): git's own message on a failure, ``None``
outside git or without git, the commit-ishes a user types, the DVC experiment and repository root a stage
records, and the command and dependency hashes ``dvc.yaml`` declares, ``foreach`` stages included."""

from __future__ import annotations

import re

import pytest

from hdkd.infra.io import dvc_md5
from hdkd.infra.provenance import (
    GitError,
    dvc_exp_name,
    git,
    git_ignored,
    git_show,
    git_state,
    repo_root,
    resolve_commit,
    stage_command,
    stage_definition,
    stage_dep_hashes,
)
from tests.helpers.git import commit_all, run_git

DVC_YAML = """stages:
  prepare:
    cmd: python -m pipeline.prepare
    deps: [data/raw, hdkd/data, missing/dep]
  train_baseline:
    foreach: [vit, resnet]
    do:
      cmd: python -m pipeline.train_baseline ${key}
      deps:
        - data/${key}
        - hdkd/models
"""


@pytest.fixture
def repo(git_repo):
    (git_repo / "a.txt").write_text("one\n")
    first = commit_all(git_repo, "first")
    (git_repo / "sub").mkdir()
    (git_repo / "sub" / "a.txt").write_text("two\n")
    second = commit_all(git_repo, "second")
    run_git(git_repo, "tag", "v1", first)
    return git_repo, first, second


def test_a_failed_git_command_raises_with_gits_own_message(repo):
    root, _, _ = repo
    with pytest.raises(GitError, match=r"^git show nope:a.txt: fatal: .*nope"):
        git("show", "nope:a.txt", repo_root=root)
    assert git("rev-parse", "HEAD", repo_root=root).decode().strip() == repo[2]


def test_resolve_commit_takes_what_a_user_types(repo):
    root, first, second = repo
    assert resolve_commit("HEAD", root) == second and re.fullmatch(r"[0-9a-f]{40}", second)
    assert resolve_commit(first[:8], root) == first
    assert resolve_commit("v1", root) == resolve_commit("HEAD~1", root) == first
    assert resolve_commit("main", root) == second
    assert resolve_commit("no-such-branch", root) is None


def test_no_commit_outside_git_or_without_git(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert resolve_commit("HEAD", outside) is None
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git at all
    assert resolve_commit("HEAD", outside) is None


def test_git_ignored_names_the_paths_git_ignores_and_none_outside_a_repository(repo, tmp_path, monkeypatch):
    root, _, _ = repo
    (root / ".gitignore").write_text("*.log\nbuild/\n")
    names = ["a.txt", "run.log", "sub dir/with space.log", "build/x.bin", "sub/a.txt"]
    assert git_ignored(root, iter(names)) == {"run.log", "sub dir/with space.log", "build/x.bin"}
    assert git_ignored(root, ["a.txt", "sub/a.txt"]) == set() and git_ignored(root, []) == set()
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_ignored(outside, ["run.log"]) == set()


def test_git_show_reads_a_file_at_a_revision(repo):
    root, first, second = repo
    assert git_show(first, "a.txt", root) == b"one\n"
    assert git_show(second, root.joinpath("sub", "a.txt").relative_to(root), root) == b"two\n"
    with pytest.raises(GitError, match="sub/a.txt"):
        git_show(first, "sub/a.txt", root)


def test_the_dvc_experiment_name_is_dvcs_variable(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-123")
    assert dvc_exp_name() == "exp-123"
    monkeypatch.setenv("DVC_EXP_NAME", "")
    assert dvc_exp_name() is None
    monkeypatch.delenv("DVC_EXP_NAME")
    assert dvc_exp_name() is None


def test_repo_root_dvc_root_wins_unless_a_start_is_given(tmp_path, monkeypatch):
    (tmp_path / "project" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "project" / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "queued").mkdir()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "queued"))
    monkeypatch.chdir(tmp_path / "project" / "deep")
    assert repo_root() == (tmp_path / "queued").resolve()
    assert repo_root(tmp_path / "project" / "deep" / "er") == (tmp_path / "project").resolve()  # searched upwards
    monkeypatch.delenv("DVC_ROOT")
    assert repo_root() == (tmp_path / "project").resolve()


def test_repo_root_of_a_dvc_experiment_copy_is_the_repository_that_queued_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    assert repo_root(copy) == tmp_path / "repo"
    git_dir = tmp_path / "g"
    (git_dir / ".git").mkdir(parents=True)
    (git_dir / "x").mkdir()
    assert repo_root(git_dir / "x") == git_dir.resolve()
    lost = tmp_path / "nowhere"
    lost.mkdir()
    assert repo_root(lost) == lost.resolve()  # nothing above marks a project: the path itself


def test_stage_definition_and_command_of_plain_and_foreach_stages(tmp_path):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    import yaml

    stages = yaml.safe_load(DVC_YAML)["stages"]
    assert stage_definition(stages, "prepare")["cmd"] == "python -m pipeline.prepare"
    assert stage_definition(stages, "train_baseline@vit") == {
        "cmd": "python -m pipeline.train_baseline vit", "deps": ["data/vit", "hdkd/models"]}
    assert stage_definition(stages, "unknown") == {} and stage_definition(stages, "unknown@x") == {}
    assert stage_command("prepare", tmp_path) == "python -m pipeline.prepare"
    assert stage_command("train_baseline@resnet", tmp_path) == "python -m pipeline.train_baseline resnet"
    assert stage_command("evaluate", tmp_path) is None
    assert stage_command("prepare", tmp_path / "elsewhere") is None  # no dvc.yaml


def test_dependency_hashes_are_dvcs_and_skip_what_is_missing_or_ignored(tmp_path):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    for d in ("data/raw", "hdkd/data", "data/vit", "hdkd/models"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "f.bin").write_bytes(d.encode())
    (tmp_path / "hdkd" / "data" / "__pycache__").mkdir()
    (tmp_path / "hdkd" / "data" / "__pycache__" / "f.pyc").write_bytes(b"compiled")
    (tmp_path / ".dvcignore").write_text("__pycache__/\n")
    hashes = stage_dep_hashes("prepare", tmp_path)
    assert list(hashes) == ["data/raw", "hdkd/data"]  # missing/dep is skipped
    assert hashes["hdkd/data"] == dvc_md5(tmp_path / "hdkd" / "data", [tmp_path / "hdkd" / "data" / "f.bin"])
    assert hashes["data/raw"] == dvc_md5(tmp_path / "data" / "raw")
    assert list(stage_dep_hashes("train_baseline@vit", tmp_path)) == ["data/vit", "hdkd/models"]
    assert stage_dep_hashes("prepare", tmp_path / "elsewhere") == {}


def test_git_runs_in_the_current_directory_by_default(repo, monkeypatch):
    root, first, second = repo
    monkeypatch.chdir(root)
    assert git("rev-parse", "HEAD").decode().strip() == second
    assert resolve_commit("HEAD") == second and git_show(first, "a.txt") == b"one\n"
    assert git_state() == {"git_commit": second, "git_dirty": False}


def test_gits_message_is_kept_even_when_it_is_not_utf8(repo):
    root, _, _ = repo
    # a file name that is not UTF-8 (b"\xff"): git repeats it in its message; the error still says what went wrong
    with pytest.raises(GitError, match="fatal: path '\ufffd.txt' does not exist in 'HEAD'"):
        git("show", "HEAD:\udcff.txt", repo_root=root)


def test_a_range_is_not_a_commit(repo):
    root, first, second = repo
    assert resolve_commit(f"{first}..{second}", root) is None
    assert resolve_commit(f"{first}:a.txt", root) is None  # a file at a commit, not a commit


@pytest.mark.parametrize("path, dirty", [
    ("a.txt", True), ("sub/a.txt", True),
    ("reports/r.json", False), ("dvc.lock", False), ("params.yaml", False),  # not code: the pipeline's own
])
def test_the_code_is_dirty_when_a_tracked_file_outside_the_pipelines_outputs_changes(repo, path, dirty):
    root, _, _ = repo
    for name in ("reports/r.json", "dvc.lock", "params.yaml"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text("{}\n")
    head = commit_all(root, "outputs")
    (root / "untracked.py").write_text("new\n")  # untracked files are not the code's modification
    (root / "reports" / "new.json").write_text("{}\n")
    assert git_state(root) == {"git_commit": head, "git_dirty": False}
    (root / path).write_text("changed\n")
    assert git_state(root) == {"git_commit": head, "git_dirty": dirty}


def test_no_git_state_outside_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}


def test_repo_root_of_the_experiments_folder_itself_is_the_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    exps = tmp_path / "repo" / ".dvc" / "tmp" / "exps"
    exps.mkdir(parents=True)
    assert repo_root(exps) == tmp_path / "repo"


def test_a_dvc_yaml_without_stages_or_a_stage_without_dependencies(tmp_path):
    (tmp_path / "dvc.yaml").write_text("plots:\n  - reports/plot.json\n")
    assert stage_command("prepare", tmp_path) is None and stage_dep_hashes("prepare", tmp_path) == {}
    (tmp_path / "dvc.yaml").write_text("stages:\n  check:\n    cmd: python -m pipeline.check\n")
    assert stage_command("check", tmp_path) == "python -m pipeline.check"
    assert stage_dep_hashes("check", tmp_path) == {}
