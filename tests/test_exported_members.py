"""The public API: what `prefect_managed` exports, and the worker's registration."""

from prefect.workers.base import BaseWorker

import prefect_managed


def test_all_names_the_public_api():
    assert sorted(prefect_managed.__all__) == [
        "ImageNotAllowed",
        "InvalidJobVariable",
        "InvalidPipPackage",
        "ManagedError",
        "ManagedJobConfiguration",
        "ManagedSettings",
        "ManagedVariables",
        "ManagedWorker",
        "Policy",
        "PolicyError",
        "RuntimeImageError",
        "__version__",
    ]
    for name in prefect_managed.__all__:
        assert hasattr(prefect_managed, name), name


def test_the_worker_type_is_registered_through_the_entry_point():
    assert BaseWorker.get_worker_class_from_type("prefect:managed") is prefect_managed.ManagedWorker
