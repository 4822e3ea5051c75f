"""`python -m benchmarks`: ManagedWorker side by side with prefect-docker's DockerWorker."""
