"""CUDA's driver started through ctypes while torch is still being imported (inspect_tools.cuda_driver): a head start
that never fails a command. On the GPU, tests/test_gpu_path.py checks that torch then works on the context."""

from __future__ import annotations

import pytest

from inspect_tools import cuda_driver


class FakeDriver:
    """libcuda as ctypes sees it: each entry point records its call and returns its configured CUresult."""

    def __init__(self, **results: int) -> None:
        self.calls: list[str] = []
        self.results = results

    def __getattr__(self, name: str):
        def call(*args: object) -> int:
            self.calls.append(name)
            return self.results.get(name, 0)
        return call


@pytest.fixture
def fresh(monkeypatch) -> None:
    monkeypatch.setattr(cuda_driver, "_started", None)


def test_the_driver_starts_and_retains_the_devices_primary_context(monkeypatch) -> None:
    driver = FakeDriver()
    monkeypatch.setattr(cuda_driver.ctypes, "CDLL", lambda name: driver)
    cuda_driver._retain_primary_context(0)
    assert driver.calls == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain"]


def test_a_driver_error_ends_the_head_start_quietly(monkeypatch) -> None:
    no_device = FakeDriver(cuInit=100)  # CUDA_ERROR_NO_DEVICE
    monkeypatch.setattr(cuda_driver.ctypes, "CDLL", lambda name: no_device)
    cuda_driver._retain_primary_context(0)
    assert no_device.calls == ["cuInit"]


def test_a_machine_without_the_driver_library_runs_on(monkeypatch, fresh) -> None:
    monkeypatch.setattr(cuda_driver, "LIBCUDA", "libnvdiag-no-such-driver.so.1")
    cuda_driver.start()
    thread = cuda_driver._started
    cuda_driver.join()
    assert thread is not None and not thread.is_alive()
    assert not thread.daemon  # a normal exit waits for it rather than ending around a thread inside a C call


def test_it_starts_once_per_process(monkeypatch, fresh) -> None:
    driver = FakeDriver()
    monkeypatch.setattr(cuda_driver.ctypes, "CDLL", lambda name: driver)
    cuda_driver.start()
    cuda_driver.start()
    cuda_driver.join()
    assert driver.calls.count("cuInit") == 1


@pytest.mark.parametrize(("device", "ordinal"), [("cuda", 0), ("cuda:1", 1), ("cpu", None), ("cuda:x", None)])
def test_a_commands_device_names_the_driver_device_it_starts(device, ordinal, monkeypatch, fresh) -> None:
    started: list[int] = []
    monkeypatch.setattr(cuda_driver, "start", started.append)
    cuda_driver.start_for(device)
    assert started == ([] if ordinal is None else [ordinal])
