"""The policy file: loading, validation messages, tiers and the pure limit helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_managed.exceptions import PolicyError
from prefect_managed.messages import (
    out_of_memory_message,
    pool_not_served_message,
    run_time_exceeded_message,
    served_pool_names,
)
from prefect_managed.policy import Policy, Tier, load_policy


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_no_file_gives_the_free_tier_with_the_seed_numbers():
    policy = load_policy(None)
    assert policy.workspace.tier == "free"
    tier = policy.tier
    assert (tier.concurrency_limit, tier.pool_limit) == (1, 1)
    assert tier.memory_bytes == 2 * 1024**3
    assert tier.max_run_seconds == 24 * 3600
    assert tier.compute_hours_per_month == 10


def test_pro_tier_has_the_seed_numbers():
    pro = Policy.model_validate({"workspace": {"tier": "pro"}}).tier
    assert (pro.concurrency_limit, pro.pool_limit, pro.compute_hours_per_month) == (10, 5, 250)
    assert pro.memory_bytes == 2 * 1024**3


def test_a_builtin_tier_can_be_partly_overridden(tmp_path):
    policy = load_policy(
        write(tmp_path, '[workspace]\ntier = "pro"\n[tiers.pro]\nconcurrency_limit = 20\n')
    )
    assert policy.tier.concurrency_limit == 20
    assert policy.tier.pool_limit == 5


def test_a_new_tier_takes_unset_numbers_from_the_free_tier(tmp_path):
    policy = load_policy(
        write(tmp_path, '[workspace]\ntier = "team"\n[tiers.team]\nconcurrency_limit = 3\n')
    )
    assert policy.tier.concurrency_limit == 3
    assert policy.tier.pool_limit == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[workspace\n", "it is not valid TOML"),
        (
            '[workspace]\ntier = "gold"\n',
            "workspace.tier 'gold' is not a tier; known tiers: free, pro",
        ),
        (
            "[tiers.pro]\nconcurrency_limit = 0\n",
            "key 'tiers.pro.concurrency_limit' = 0: Input should be greater than or equal to 1",
        ),
        (
            "[tiers.free]\nmax_run_seconds = -5\n",
            "key 'tiers.free.max_run_seconds' = -5: Input should be greater than or equal to 1",
        ),
        (
            "[tiers.free]\ncpus = 1e-10\n",
            "key 'tiers.free.cpus' = 1e-10: Input should be greater than or equal to 0.01",
        ),
        (
            "[tiers.free]\ncpus = inf\n",
            "key 'tiers.free.cpus' = inf: Input should be less than or equal to 1024",
        ),
        (
            "[tiers.free]\ncompute_hours_per_month = nan\n",
            "key 'tiers.free.compute_hours_per_month' = nan: Input should be",
        ),
        ("[tiers.free]\nmemory = true\n", "key 'tiers.free.memory'"),
        (
            "[tiers.free]\nconcurrency_limit = true\n",
            "key 'tiers.free.concurrency_limit': true is not a number",
        ),
        (
            '[tiers.free]\nmemory = "1k"\n',
            "key 'tiers.free.memory': '1k' is outside the sane range 6 MiB to 1024 GiB",
        ),
        (
            "[tiers.free]\nmax_run_seconds = 99999999999\n",
            "key 'tiers.free.max_run_seconds' = 99999999999: Input should be less than or equal to 31622400",
        ),
        (
            "[tiers.free]\ngpus = -1\n",
            "key 'tiers.free.gpus' = -1: Input should be greater than or equal to 0",
        ),
        (
            "[tiers.free]\ngpus = 1.5\n",
            "key 'tiers.free.gpus' = 1.5: Input should be a valid integer",
        ),
        ("[tiers.free]\ngpus = true\n", "key 'tiers.free.gpus': true is not a number"),
        (
            "[tiers.free]\ngpus = 1000\n",
            "key 'tiers.free.gpus' = 1000: Input should be less than or equal to 64",
        ),
        (
            "[tiers.free]\ninfrastructure_retries = -1\n",
            "key 'tiers.free.infrastructure_retries' = -1: Input should be greater than or equal to 0",
        ),
        (
            "[tiers.free]\ninfrastructure_retries = 6\n",
            "key 'tiers.free.infrastructure_retries' = 6: Input should be less than or equal to 5",
        ),
        (
            "[tiers.free]\ninfrastructure_retries = true\n",
            "key 'tiers.free.infrastructure_retries': true is not a number",
        ),
        (
            '[tiers.free]\ninfrastructure_retries = "2"\n',
            "key 'tiers.free.infrastructure_retries' = '2': Input should be a valid integer",
        ),
        (
            "[tiers.free]\ninfrastructure_retries = 1.0\n",
            "key 'tiers.free.infrastructure_retries' = 1.0: Input should be a valid integer",
        ),
        (
            '[tiers.free]\ndisk = "1m"\n',
            "key 'tiers.free.disk': '1m' is outside the sane range 1 GiB to 16384 GiB",
        ),
        (
            "[runtime]\npids_limit = 1\n",
            "key 'runtime.pids_limit' = 1: Input should be greater than or equal to 16",
        ),
        (
            '[runtime]\nlog_max_size = "10g"\n',
            "key 'runtime.log_max_size': '10g' is outside the sane range",
        ),
        (
            '[tiers.free]\ncontainer_output_max_size = "lots"\n',
            "key 'tiers.free.container_output_max_size': 'lots' is not a size",
        ),
        (
            "[tiers.free]\ncontainer_output_max_size = -1\n",
            "key 'tiers.free.container_output_max_size': -1 must be 0 (off) or more",
        ),
        (
            '[tiers.free]\ncontainer_output_max_size = "1g"\n',
            "key 'tiers.free.container_output_max_size': '1g' is outside the sane range 1 KiB "
            "to 64 MiB",
        ),
        (
            "[tiers.free]\ncontainer_output_max_size = true\n",
            "key 'tiers.free.container_output_max_size': True is not a size",
        ),
        ('[tiers.free]\nmemory = "lots"\n', "key 'tiers.free.memory': 'lots' is not a size"),
        ('[tiers.free]\nmemory = "0"\n', "key 'tiers.free.memory': '0' must be more than zero"),
        ("[runtime]\nprivileged = true\n", "key 'runtime.privileged' is not a known setting"),
        (
            "[tiers.free]\nconcurency_limit = 3\n",
            "key 'tiers.free.concurency_limit' is not a known setting",
        ),
        (
            '[runtime]\ndefault_image = "evil:latest"\n',
            "default_image 'evil:latest' is not in allowed_images",
        ),
        ('[runtime]\nuser = "0"\n', "key 'runtime.user'"),
        ('[workspace]\nname = "Not A Slug"\n', "key 'workspace.name'"),
    ],
)
def test_a_bad_policy_file_is_named_with_its_key_and_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"Policy file {str(path)!r} is not usable: ")
    assert expected in message
    assert "\n" not in message


def test_a_policy_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_bytes(b'[workspace]\nname = "caf\xe9"\n')
    with pytest.raises(PolicyError, match="it is not UTF-8 text \\(byte 0xe9 at offset 23\\)"):
        load_policy(path)


def test_a_missing_policy_file_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="the file does not exist"):
        load_policy(tmp_path / "nope.toml")


def test_image_allow_list_admits_official_and_runtime_images_only():
    runtime = Policy().runtime
    assert runtime.image_allowed("prefecthq/prefect:3-latest")
    assert runtime.image_allowed("prefecthq/prefect:3.9.1-python3.12")
    assert runtime.image_allowed("prefect-managed-runtime:3.9.1")
    assert not runtime.image_allowed("prefecthq/prefect:2-latest")
    assert not runtime.image_allowed("python:3.12")
    assert not runtime.image_allowed("evil/prefecthq/prefect:3-latest")


def test_oldest_pools_are_served():
    pools = [("c", 3), ("a", 1), ("b", 2)]
    assert served_pool_names(pools, 2) == ["a", "b"]


def test_messages_name_the_limit_the_tier_and_what_to_do():
    policy = Policy()
    oom = out_of_memory_message(policy, 2 * 1024**3)
    assert "free tier's memory limit of 2 GiB" in oom and "Lower the memory" in oom
    asked_less = out_of_memory_message(policy, 300 * 1024**2)
    assert "300 MiB its deployment asked for (mem_limit" in asked_less
    timeout = run_time_exceeded_message(policy)
    assert "maximum run time of 24 h (86400 s" in timeout
    not_served = pool_not_served_message(policy, "late-pool", ["first-pool"])
    assert "'late-pool' is not served" in not_served
    assert "free tier, which allows 1 managed work pool (the oldest: 'first-pool')" in not_served


def test_the_pro_2025_tier_has_todays_managed_sizes():
    tier = Policy().tiers["pro-2025"]
    assert (tier.cpus, tier.memory_bytes, tier.disk_bytes) == (4.0, 16 * 2**30, 128 * 2**30)
    assert (tier.concurrency_limit, tier.pool_limit, tier.gpus) == (10, 5, 0)
    assert Policy().tiers["free"].memory_bytes == 2 * 2**30  # the seed's tiers unchanged


def test_infrastructure_retries_are_off_unless_a_tier_sets_them(tmp_path):
    assert all(tier.infrastructure_retries == 0 for tier in Policy().tiers.values())
    path = write(tmp_path, "[tiers.free]\ninfrastructure_retries = 2\n")
    assert load_policy(path).tier.infrastructure_retries == 2


def test_container_output_max_size_defaults_to_one_mib_and_zero_is_off(tmp_path):
    assert Tier().container_output_max_bytes == 2**20
    path = tmp_path / "policy.toml"
    path.write_text("[tiers.free]\ncontainer_output_max_size = 0\n")
    assert load_policy(path).tier.container_output_max_bytes == 0
    path.write_text('[tiers.free]\ncontainer_output_max_size = "64k"\n')
    assert load_policy(path).tier.container_output_max_bytes == 64 * 2**10


def test_in_run_installs_with_the_official_default_image_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("[runtime]\nprebuilt_environments = false\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(path)
    message = str(refused.value)
    assert "prebuilt_environments = false" in message
    assert "'prefecthq/prefect:3-latest'" in message and "uid 1000" in message
    assert "keep prebuilt_environments = true" in message
    # With an image whose environment the runs' uid owns, it is the operator's choice.
    path.write_text(
        '[runtime]\nprebuilt_environments = false\ndefault_image = "prefect-managed-runtime:3.9.1"\n'
    )
    assert load_policy(path).runtime.prebuilt_environments is False
