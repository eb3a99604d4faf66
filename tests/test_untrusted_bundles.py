"""A class bundle is untrusted input (issue 19): crafted bundles are refused in one line, before anything is
written or removed, and nothing outside ``--into`` is ever touched (a sentinel folder beside it)."""
import hashlib
import io as bytes_io
import json
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emloc import bundle, cli
from emloc.errors import EmlocError

CONFIG = b"model: default\n"


def tree(folder):
    """Every path under ``folder`` with its bytes (files) or None (folders): a snapshot to compare."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def entry(data: bytes, size: int | None = None) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data) if size is None else size}


def craft(path, runs, members, files=None, version=bundle.VERSION):
    """A bundle whose ``BUNDLE.json`` lists ``runs`` and ``files`` (default: every regular member, honestly)."""
    if files is None:
        files = {info.name: entry(data) for info, data in members if info.isreg()}
    manifest = json.dumps({"format": bundle.FORMAT, "version": version, "runs": runs, "files": files}).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(bundle.MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, bytes_io.BytesIO(manifest))
        for info, data in members:
            tar.addfile(info, bytes_io.BytesIO(data) if info.isreg() else None)
    return path


def member(name, data=CONFIG, kind=tarfile.REGTYPE, link="", size=None):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if size is None and kind == tarfile.REGTYPE else (size or 0)
    return info, data


@pytest.fixture
def place(tmp_path):
    """``tmp_path`` with a victim folder of someone's files beside the target; returns (tmp_path, snapshot)."""
    victim = tmp_path / "victim"
    (victim / "into").mkdir(parents=True)
    (victim / "precious.txt").write_text("someone's work")
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "keep.txt").write_text("must survive")
    return tmp_path


def refused(argv, capsys) -> str:
    """Run ``emloc ARGV``: exit 2 with exactly one stderr line; returns that line."""
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("emloc: error: "), err
    return err


def assert_refused_and_untouched(place, argv, capsys, match: str) -> str:
    before = tree(place)
    line = refused(argv, capsys)
    assert match in line, line
    assert tree(place) == before  # nothing written, nothing removed: not even an empty --into
    return line


def test_absolute_run_name_is_refused_and_deletes_nothing(place, capsys):
    victim = place / "victim"
    file = craft(place / "b.tar.gz", [str(victim)], [member(f"{victim}/config.yaml".lstrip("/"))],
                 files={f"{victim}/config.yaml": entry(CONFIG)})
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "new")], capsys,
                                 "not a plain folder name")
    assert (victim / "precious.txt").exists()


def test_dot_dot_run_name_is_refused_and_deletes_nothing(place, capsys):
    file = craft(place / "b.tar.gz", [".."], [member("x/config.yaml")], files={"../config.yaml": entry(CONFIG)})
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "victim" / "into")],
                                 capsys, "'..', which is not a plain folder name")


@pytest.mark.parametrize("name", ["a/b", "a\\b", ".", "", "bad\nname", "/"])
def test_run_names_that_are_not_one_plain_component(place, capsys, name):
    file = craft(place / "b.tar.gz", [name], [member("seed0/config.yaml")], files={f"{name}/config.yaml": entry(CONFIG)})
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "new")], capsys,
                                 "not a plain folder name")


@pytest.mark.parametrize("kind, link, match", [
    (tarfile.SYMTYPE, "../../victim/precious.txt", "not a plain file inside the bundle"),
    (tarfile.LNKTYPE, "seed0/config.yaml", "not a plain file inside the bundle"),
    (tarfile.CHRTYPE, "", "not a plain file inside the bundle"),
    (tarfile.FIFOTYPE, "", "not a plain file inside the bundle"),
])
def test_links_and_device_members_are_refused(place, capsys, kind, link, match):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml"), member("seed0/other", kind=kind, link=link)],
                 files={"seed0/config.yaml": entry(CONFIG), "seed0/other": entry(b"")})
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "new")], capsys, match)


def test_duplicate_members_are_refused(place, capsys):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml"), member("seed0/config.yaml", b"evil: 1\n")],
                 files={"seed0/config.yaml": entry(CONFIG)})
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "new")], capsys,
                                 "holds 'seed0/config.yaml' twice")


def test_member_larger_than_declared_is_refused_before_extraction(place, capsys):
    big = b"x" * 10_000
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml", big)],
                 files={"seed0/config.yaml": entry(CONFIG)})
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "new")], capsys,
                                 "holds 10000 bytes where BUNDLE.json declares 15")


def test_declared_total_over_the_cap_is_refused(place, capsys):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml")],
                 files={"seed0/config.yaml": entry(CONFIG, size=5 * 2**30)})
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "new")], capsys,
                                 "over the 4 GiB a class bundle may hold")


def test_declared_total_over_the_free_space_is_refused(place, capsys, monkeypatch):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml")])
    monkeypatch.setattr(bundle.shutil, "disk_usage", lambda path: type("usage", (), {"free": 3})())
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "new")], capsys,
                                 "free some space")


def test_into_an_existing_file_is_one_line(place, capsys):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml")])
    (place / "afile").write_text("not a folder")
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "afile")], capsys,
                                 "is a file, not a folder")
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "afile" / "deeper")],
                                 capsys, "is a file, not a folder")


def test_a_link_in_place_of_a_run_is_not_followed(place, capsys):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml")])
    (place / "into").mkdir()
    (place / "into" / "seed0").symlink_to(place / "victim")
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "into"), "--replace"],
                                 capsys, "is a link to another place")


def test_unpack_over_an_existing_run_needs_replace_and_keeps_own_files(place, capsys):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml")])
    into = place / "into"
    (into / "seed0").mkdir(parents=True)
    (into / "seed0" / "config.yaml").write_text("model: old\n")
    (into / "seed0" / "mynotes.txt").write_text("a student's notes")
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(into)], capsys,
                                 "already exists: pass --replace")
    assert cli.main(["bundle", "unpack", str(file), "--into", str(into), "--replace"]) == 0
    out = capsys.readouterr().out
    assert "seed0: kept 1 file(s) of yours the bundle does not hold: mynotes.txt" in out
    assert (into / "seed0" / "config.yaml").read_bytes() == CONFIG
    assert (into / "seed0" / "mynotes.txt").read_text() == "a student's notes"
    assert sorted(p.name for p in into.iterdir()) == ["seed0"]


def test_a_refused_bundle_leaves_no_empty_folder(place, capsys):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml")],
                 files={"seed0/config.yaml": {"sha256": "0" * 64, "bytes": len(CONFIG)}})  # fails only its checksum
    assert_refused_and_untouched(place, ["bundle", "unpack", str(file), "--into", str(place / "a" / "b" / "c")],
                                 capsys, "does not match its checksum")


def test_a_good_crafted_bundle_unpacks(place, capsys):
    file = craft(place / "b.tar.gz", ["seed0"], [member("seed0/config.yaml"), member("seed0/sub/x.json", b"{}")])
    assert cli.main(["bundle", "unpack", str(file), "--into", str(place / "new")]) == 0
    assert tree(place / "new") == {"seed0": None, "seed0/config.yaml": CONFIG, "seed0/sub": None, "seed0/sub/x.json": b"{}"}


# ---- any archive and manifest: unpacked when valid, else refused cleanly --------------------------------

NAMES = st.sampled_from(["seed0", "seed1", "..", ".", "", "/abs", "a/b", "ok\x07", "seed0/../..", "BUNDLE.json"])
PATHS = st.sampled_from(["config.yaml", "sub/x.json", "../x", "", "/etc/x", "a//b", "./y"])
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                         tarfile.LNKTYPE, tarfile.CHRTYPE])


@st.composite
def archives(draw):
    """Half near-valid bundles (plain names, honest listing, then perhaps one thing changed), half anything."""
    plain = draw(st.booleans())
    names, paths = (st.sampled_from(["seed0", "seed1"]), st.sampled_from(["config.yaml", "sub/x.json"])) if plain \
        else (NAMES, PATHS)
    runs = draw(st.lists(names, min_size=1 if plain else 0, max_size=3, unique=plain))
    members = []
    for _ in range(draw(st.integers(1 if plain else 0, 4))):
        name = f"{draw(st.sampled_from(runs) if plain else names)}/{draw(paths)}"
        kind = tarfile.REGTYPE if plain and draw(st.integers(0, 5)) else draw(KINDS)
        members.append(member(name, draw(st.binary(max_size=20)), kind=kind, link=draw(PATHS)))
    files = None  # an honest listing
    if not (plain and draw(st.integers(0, 3))):
        files = {info.name: entry(data, draw(st.sampled_from([None, None, 0, 2**33])))
                 for info, data in members if info.isreg() and draw(st.booleans())}
    return runs, members, files, draw(st.sampled_from([bundle.VERSION] * 5 + [99]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(archive=archives())
def test_any_archive_is_unpacked_or_refused_cleanly(tmp_path_factory, archive):
    place = tmp_path_factory.mktemp("fuzz")
    (place / "sentinel").mkdir()
    (place / "sentinel" / "keep.txt").write_text("must survive")
    runs, members, files, version = archive
    file = craft(place / "b.tar.gz", runs, members, files, version)
    before = tree(place)
    into = place / "into"
    try:
        unpacked = bundle.unpack(file, into)
    except EmlocError as error:
        assert "\n" not in str(error)
        assert tree(place) == before
        return
    # accepted: exactly the listed runs, each directly inside the target, holding exactly the listed files
    assert [p.parent for p in unpacked.runs] == [into] * len(runs) and [p.name for p in unpacked.runs] == runs
    after = tree(place)
    assert {k: v for k, v in after.items() if not k.startswith("into")} == before
    listed = {info.name: data for info, data in members if info.isreg()}
    assert {k[len("into/"):]: v for k, v in after.items() if k.startswith("into/") and v is not None} == listed
