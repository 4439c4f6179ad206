"""The task registry: 210 tasks, splits and lookups."""
import csv
from pathlib import Path

import pytest

from mmbench2_lab.tasks import UnknownTaskError, all_tasks, domains, get_task, tasks

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tasks.csv"


def test_registry_has_the_210_tasks_with_the_paper_split_sizes():
    ts = all_tasks()
    assert len(ts) == 210 and [t.index for t in ts] == list(range(210))
    assert len(domains()) == 10
    assert len(tasks(split="pretrain")) == 190
    assert len(tasks(split="seen")) == 10 and len(tasks(split="unseen")) == 10
    assert sum(t.in_pretraining for t in ts) == 200


def test_bundled_table_equals_the_shared_source():
    if not SHARED.exists():
        pytest.skip("shared/ not beside the repository")
    rows = list(csv.DictReader(SHARED.open()))
    for row in rows:
        t = get_task(row["task"])
        assert (t.index, t.domain, t.split, t.frames, t.action_dim, t.max_episode_steps) == (
            int(row["index"]), row["domain"], row["split"], int(row["frames"]), int(row["action_dim"]),
            int(row["max_episode_steps"]))


def test_task_carries_what_make_env_needs():
    q = get_task("quadruped-run")
    assert (q.simulator, q.camera, q.action_repeat) == ("dm_control", "2", 2)
    assert get_task("og-point-maze").action_repeat == 4
    assert get_task("mujoco-halfcheetah").action_repeat == 1
    c = get_task("cheetah-run")
    assert c.action_mask == [1.0] * 6 + [0.0] * 10
    assert c.prompt.endswith("Run forward quickly.")


def test_unknown_task_suggests_close_matches():
    with pytest.raises(UnknownTaskError, match="cheetah-run"):
        get_task("cheetah-rnu")


def test_query_by_domain_and_split():
    seen_dmc = tasks(domain="dmcontrol", split="seen")
    assert {t.name for t in seen_dmc} == {"cup-catch", "finger-turn-easy"}
    with pytest.raises(ValueError, match="unknown domain"):
        tasks(domain="dmcontrl")


def test_tasks_command_prints_csv_for_scripts(capsys):
    from mmbench2_lab.cli import main
    assert main(["tasks", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "task,domain,split,runnable" and len(lines) == 211
    rows = dict((line.split(",")[0], line.split(",")[3]) for line in lines[1:])
    assert set(rows.values()) <= {"true", "false"}
    assert rows["cheetah-run"] == "true" and rows["ms-push-cube"] == "false"
