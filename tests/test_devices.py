"""One device resolver for every entry point (``core.devices``): ``auto`` resolved, a named device checked
before any work, the same refusal from ``glom evaluate``, ``glom jobs run`` and the detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.cli import main as glom
from core.devices import DeviceError, resolve_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_auto_and_named_devices() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'bogus'"):
        resolve_device("bogus")


@no_gpu
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_everywhere(tmp_path: Path, capsys) -> None:
    from core.detection.inference import resolve_device as detector_resolve
    from core.jobs import resolve_device as job_resolve

    for resolve in (resolve_device, detector_resolve, job_resolve):
        with pytest.raises(DeviceError, match="'cuda:1' was asked for but this machine has no CUDA GPU"):
            resolve("cuda:1")
    assert job_resolve("auto") == "cpu"
    # refused before the checkpoint is even opened (it does not exist)
    assert glom(["evaluate", str(tmp_path / "none.safetensors"), "--device", "cuda"]) == 2
    assert "device 'cuda' was asked for but this machine has no CUDA GPU" in capsys.readouterr().err
