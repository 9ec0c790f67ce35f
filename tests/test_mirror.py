import pytest

from glit_ray.cluster.mirror import Mirror, push_order
from glit_ray.core.errors import UserError


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_what_changed_and_deletes_what_is_gone(tmp_path):
    run, remote = tmp_path / "run", tmp_path / "remote"
    (run / "candidates").mkdir(parents=True)
    (run / "candidates" / "gen-0000.parquet").write_bytes(b"rows 0")
    (run / "best.json").write_text("{}")
    (run / "tune").mkdir()
    (run / "tune" / "searcher-state.pkl").write_bytes(b"state")
    (run / "candidates" / ".gen-0001.parquet.tmp").write_bytes(b"half")  # a write in progress is not pushed
    mirror = Mirror(run, remote.as_uri())
    assert mirror.push() == 3
    assert tree(remote) == {k: v for k, v in tree(run).items() if not k.endswith(".tmp")}
    assert mirror.push() == 0  # nothing changed
    (run / "best.json").write_text('{"arch": "x"}')
    (run / "tune" / "searcher-state.pkl").unlink()
    assert mirror.push() == 1
    assert tree(remote) == {"candidates/gen-0000.parquet": b"rows 0", "best.json": b'{"arch": "x"}'}


def test_tunes_state_is_pushed_after_the_results_it_describes():
    names = ["tune/experiment_state.json", "candidates/gen-0003.parquet", "best.json", "tune/searcher-state.pkl",
             "supernet/supernet.pt", "tb/events"]
    assert push_order(names)[-2:] == ["tune/experiment_state.json", "tune/searcher-state.pkl"]


def test_pull_restores_the_run_and_refuses_to_overwrite(tmp_path):
    run, remote = tmp_path / "run", tmp_path / "remote"
    (run / "tune").mkdir(parents=True)
    (run / "tune" / "state").write_bytes(b"s")
    (run / "run.json").write_text("{}")
    Mirror(run, remote.as_uri()).push()
    lost = tmp_path / "new-head"
    pulled = Mirror(lost, remote.as_uri())
    assert pulled.pull() == 2 and tree(lost) == tree(run)
    assert pulled.push() == 0  # what was pulled is not pushed back
    with pytest.raises(UserError, match="is not empty"):
        Mirror(run, remote.as_uri()).pull()
    assert tree(run) == tree(lost)
    with pytest.raises(UserError, match="holds no run"):
        Mirror(tmp_path / "other", (tmp_path / "nothing").as_uri()).pull()
    with pytest.raises(UserError, match="not a storage URI"):
        Mirror(run, "nosuchscheme://bucket/x")
