"""DESIGN §2 prefixes and §3 key rules."""

from datetime import datetime

import pytest

from esmail.keys import extension, folder_name, prefix_of, safe_path, unique_names, with_suffix


@pytest.mark.parametrize("address, prefix", [
    ("Sheffield@datafeeds.example.org", "sheffield"),
    ("<npower-eon@x.org>", "npower-eon"),
    ("a.b+c_d@x", "a.b+c_d"),
    (".lead@x", None), ("trail.@x", None), ("a..b@x", None), ("a b@x", None), ("a/b@x", None),
    ("caf\u00e9@x", None), ("@x", None),
])
def test_prefix(address, prefix):
    assert prefix_of(address) == prefix


@pytest.mark.parametrize("name, safe", [
    ("../../etc/passwd", "etc/passwd"), ("/abs/x.csv", "abs/x.csv"), ("a//b/./c", "a/b/c"),
    ("a\\b.csv", "a/b.csv"), ("ctl\x00\x1f\x7fname.csv", "ctlname.csv"), ("..", "unnamed"), ("", "unnamed"),
])
def test_safe_path(name, safe):
    assert safe_path(name) == safe


def test_long_names_are_cut_keeping_the_extension():
    name = safe_path("x" * 500 + ".csv")
    assert name.endswith(".csv") and len(name.encode()) <= 200


@pytest.mark.parametrize("name, n, result", [
    ("export.csv", 2, "export-2.csv"), ("export.xlsx.csv", 2, "export-2.xlsx.csv"), ("sub/a.b/c.csv", 3, "sub/a.b/c-3.csv"),
    ("README", 2, "README-2"), (".hidden", 2, ".hidden-2"), ("x.csv", 1, "x.csv"),
])
def test_with_suffix(name, n, result):
    assert with_suffix(name, n) == result


def test_extension_is_case_insensitive_and_ignores_folders():
    assert extension("A.b/Export.XLSX") == ".xlsx" and extension("a.b/noext") == "" and extension(".csv") == ""


def test_folder_names():
    t = datetime(2025, 3, 23, 10, 11, 12)
    assert folder_name(t) == "20250323-101112" and folder_name(t, 2) == "20250323-101112-2"


def test_unique_names_per_bucket():
    pairs = [("amr", "export.csv"), ("amr", "export.csv"), ("un", "export.csv"), ("amr", "export.csv"), ("amr", "export-2.csv")]
    assert unique_names(pairs) == [("amr", "export.csv"), ("amr", "export-2.csv"), ("un", "export.csv"), ("amr", "export-3.csv"), ("amr", "export-2-2.csv")]
