"""``train.predict``: the evaluated (and saved) logits are float32, whatever the training used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrun import train
from calibrun.config import validate
from calibrun.data import DeviceLoader
from calibrun.data.splits import Split
from conftest import FAST


class _RecordsAutocast(torch.nn.Module):
    """A linear layer that records, per call, whether autocast was on and the dtypes seen."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.calls: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        self.calls.append((torch.is_autocast_enabled(x.device.type), out.dtype))
        return out


def _loader(n: int = 10, batch_size: int = 4) -> DeviceLoader:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 4), dtype=torch.uint8, generator=g),
                  torch.arange(n) % 3, torch.arange(n))
    return DeviceLoader(split, batch_size, torch.device("cpu"), lambda images, generator: images.float() / 255)


def test_predict_runs_in_float32_even_inside_a_bf16_autocast_block():
    model, loader = _RecordsAutocast(), _loader()
    with torch.no_grad():
        expected = torch.cat([model.linear(x) for x, _ in loader])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, labels = train.predict(model, loader)
    assert model.calls == [(False, torch.float32)] * len(loader)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert torch.equal(labels, torch.arange(10) % 3)


@pytest.mark.gpu
def test_bf16_trained_run_saves_the_float32_logits_of_its_final_weights(compose_cfg, tmp_path):
    cfg = validate(compose_cfg([*FAST, "trainer.device=cuda", "trainer.amp=true", "trainer.select=last"]))
    train.run(cfg, tmp_path / "run")
    with np.load(tmp_path / "run" / "logits" / "test.npz") as saved:
        assert saved["logits"].dtype == np.float32
        saved_logits = torch.from_numpy(saved["logits"]).cuda()
    # The same model and test loader, rebuilt, with the run's final weights.
    rebuilt, _, _ = train.prepare(cfg, tmp_path / "rebuilt")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cuda", weights_only=False)
    rebuilt.model.load_state_dict(state["model"])
    rebuilt.model.eval()
    with torch.no_grad():
        fp32 = torch.cat([rebuilt.model(x) for x, _ in rebuilt.eval_loaders["test"]])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = torch.cat([rebuilt.model(x).float() for x, _ in rebuilt.eval_loaders["test"]])
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(saved_logits, fp32, rtol=1e-5, atol=1e-5)
    # bf16 logits would have failed the check above: they are far further off.
    assert (bf16 - fp32).abs().max() > 100 * 1e-5
