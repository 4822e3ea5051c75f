"""pip_packages validation and the early-exit message (pure logic)."""

from __future__ import annotations

import pytest

from prefect_managed.dependencies import (
    describe_early_exit,
    normalize_pip_packages,
    split_extra_pip_packages,
)
from prefect_managed.exceptions import InvalidPipPackage


def test_valid_requirements_are_normalized_and_deduplicated():
    assert normalize_pip_packages(
        ["pandas >= 2.2, <3", "Prefect-AWS", "pandas>=2.2,<3", "a[b]"]
    ) == [
        "pandas<3,>=2.2",
        "Prefect-AWS",
        "a[b]",
    ]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("pandas; rm -rf /", "not a valid requirement"),
        ("../evil", "not a valid requirement"),
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("--index-url=http://127.0.0.1:1/simple", "installer options are not accepted"),
        ("-e .", "installer options are not accepted"),
        ("evil @ https://example.invalid/evil.whl", "direct URL requirements are not allowed"),
        ('pandas; python_version >= "3.8"', "environment markers"),
        ("pandas $(id)", "not a valid requirement"),
        (3, "it is not a string"),
    ],
)
def test_bad_entries_are_rejected_naming_the_entry(entry, reason):
    with pytest.raises(InvalidPipPackage) as caught:
        normalize_pip_packages(["six", entry])
    assert f"pip_packages entry {entry!r} was rejected" in str(caught.value)
    assert reason in str(caught.value)


def test_url_requirements_pass_when_the_policy_allows_them():
    assert normalize_pip_packages(["probe @ https://127.0.0.1/p.whl"], allow_urls=True) == [
        "probe@https://127.0.0.1/p.whl"
    ]


def test_extra_pip_packages_split_like_the_entrypoint():
    assert split_extra_pip_packages(" six  pandas>=2 ") == ["six", "pandas>=2"]
    assert split_extra_pip_packages(None) == []


def test_failed_install_message_quotes_uv_error_and_cause():
    output = [
        "+uv pip install nope==1",
        "Using Python 3.11.2 environment at: venv",
        "error: No solution found when resolving dependencies",
        "  cause: Because nope was not found in the package registry",
    ]
    message = describe_early_exit(1, ["nope==1"], output)
    assert message.startswith("Installing pip_packages nope==1 failed before the flow started")
    assert "(the container exited with code 1)" in message
    assert "No solution found" in message and "not found in the package registry" in message


def test_other_early_exit_message_quotes_the_last_line():
    message = describe_early_exit(2, [], ["something", "fatal: repository not found", ""])
    assert "exited with code 2 before the flow started: fatal: repository not found" in message
