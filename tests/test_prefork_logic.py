"""The pre-fork executor's pure decisions (prefect_managed/runtime/prefork.py): which
repository files shadow a module it imported, which variables the interpreter reads at
start, and the `-m` name of a module of Prefect's. Its behaviour with a real server and
engine, against Prefect's own command, is in tests/test_executor.py."""

from __future__ import annotations

import sys

import prefect.engine

from prefect_managed.runtime import prefork


def test_a_module_file_or_package_of_an_imported_name_shadows(tmp_path):
    (tmp_path / "flows.py").write_text("")
    assert prefork.shadowed([str(tmp_path)]) is None
    (tmp_path / "json.py").write_text("")  # imported (the standard library's) already
    assert prefork.shadowed([str(tmp_path)]) == str(tmp_path / "json.py")


def test_a_package_shadows_but_a_namespace_directory_does_not(tmp_path):
    (tmp_path / "prefect").mkdir()
    assert prefork.shadowed([str(tmp_path)]) is None  # no __init__.py: a namespace portion
    (tmp_path / "prefect" / "__init__.py").write_text("")
    assert prefork.shadowed([str(tmp_path)]) == str(tmp_path / "prefect")


def test_other_files_and_missing_directories_do_not_shadow(tmp_path):
    (tmp_path / "json.txt").write_text("")
    (tmp_path / "os.md").write_text("")
    (tmp_path / ".git").mkdir()
    assert prefork.shadowed([str(tmp_path), str(tmp_path / "missing")]) is None


def test_the_interpreters_start_variables_leave_pythonpath_to_sys_path():
    env = {"PYTHONPATH": "/a", "PYTHONUNBUFFERED": "1", "PATH": "/bin", "PREFECT_X": "1"}
    assert prefork.startup_environment(env) == {"PYTHONUNBUFFERED": "1"}


def test_the_dash_m_name_of_prefects_modules():
    assert prefork.module_name(prefect.engine.__file__) == "prefect.engine"


def test_a_new_interpreters_sys_path_is_its_directory_pythonpath_then_the_interpreters(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "path", ["/script-dir", "/own-pythonpath", "/usr/lib/python3.11"])
    monkeypatch.setenv("PYTHONPATH", "/own-pythonpath")
    interpreter = prefork.Interpreter()
    assert interpreter.base_path == ["/usr/lib/python3.11"]


def test_path_entries_are_made_absolute_and_unique_as_site_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prefork.absolute_path(["src", str(tmp_path / "src"), "/a/", "/a", "."]) == [
        str(tmp_path / "src"),
        "/a",
        str(tmp_path),
    ]
