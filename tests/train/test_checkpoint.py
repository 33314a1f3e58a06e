"""Checkpoints: bitwise round trip (model, optimizer, scheduler, data, RNG), atomicity under a crash,
clear errors on truncated / corrupt checkpoints, fallback to the previous one, pruning."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from glm5.train import checkpoint as ck
from glm5.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_latest, save_checkpoint
from glm5.train.optim import Muon
from glm5.train.schedule import ScheduleConfig, build_scheduler


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: stored once, restored under both names
        self.register_buffer("bias_buf", torch.arange(11, dtype=torch.bfloat16) / 3)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = Muon([{"params": [model.proj.weight], "use_muon": True},
                {"params": [model.embed.weight, model.proj.bias], "use_muon": False}], lr=1e-2)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2, total_steps=20))
    return model, opt, sched


def _step(model, opt, sched):
    """One training step whose data comes from all three RNGs, so a wrong RNG restore changes the loss."""
    x = torch.randint(0, 11, (4, 5))
    noise = torch.randn(4, 5, 8) * 0.01 + float(np.random.rand()) * 0.01 + random.random() * 0.01
    h = torch.tanh(model.proj(model.embed(x) + noise))
    loss = nn.functional.cross_entropy(model.head(h).flatten(0, 1), x.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def test_round_trip_is_bitwise_and_resumes_exactly(tmp_path):
    model, opt, sched = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    data_state = {"epoch": 1, "position": 40, "seed": 7}
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, data=data_state,
                    config={"lr": 1e-2, "name": "tiny"}, extra={"tokens": 1234})
    ref_losses = [_step(model, opt, sched) for _ in range(4)]
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a fresh process, other RNG states
    model2, opt2, sched2 = _setup(seed=5)
    ckpt = load_latest(tmp_path, model=model2, optimizer=opt2, scheduler=sched2)
    assert ckpt.step == 3 and ckpt.data_state == data_state and ckpt.extra == {"tokens": 1234}
    assert ckpt.config == {"lr": 1e-2, "name": "tiny"}
    assert model2.head.weight is model2.embed.weight
    assert ckpt.model_state["bias_buf"].dtype == torch.bfloat16
    losses = [_step(model2, opt2, sched2) for _ in range(4)]
    assert losses == ref_losses  # exact, not approximately
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_rng_round_trip():
    state = ck.capture_rng_state()
    a = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ck.restore_rng_state(state)
    b = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_crash_mid_save_keeps_last_good(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt, sched)

    real = ck._torch_save

    def crash(obj, path):  # the model file is already written when the optimizer save "dies"
        assert (path.parent / "model.safetensors").is_file()
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck, "_torch_save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]

    # a hard kill leaves its temp folder behind: it is ignored, then cleaned by the next save
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    monkeypatch.undo()
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    model2, opt2, sched2 = _setup(seed=3)
    assert load_latest(tmp_path, model=model2, optimizer=opt2, scheduler=sched2).step == 1
    assert all(torch.equal(v, good[k]) for k, v in model2.state_dict().items())
    monkeypatch.setattr(ck, "_torch_save", real)
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "missing_file"])
def test_corrupt_checkpoint_clear_error_and_fallback(tmp_path, damage):
    model, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    _step(model, opt, sched)
    p2 = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    f = p2 / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
        match = "model.safetensors has .* bytes.*truncated"
    elif damage == "flip":
        raw = bytearray(f.read_bytes())
        raw[-5] ^= 0xFF
        f.write_bytes(bytes(raw))
        match = "model.safetensors fails its sha256"
    elif damage == "no_manifest":
        (p2 / "manifest.json").unlink()
        match = "no manifest.json"
    else:
        (p2 / "optimizer.pt").unlink()
        match = "optimizer.pt is missing"
    model2, opt2, sched2 = _setup(seed=4)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p2, model=model2, optimizer=opt2)
    assert all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())  # nothing was touched
    with pytest.raises(CheckpointError, match=match):
        load_latest(tmp_path, fallback=False, model=model2)
    with pytest.warns(UserWarning, match="skipping checkpoint step 2"):
        assert load_latest(tmp_path, model=model2, optimizer=opt2, scheduler=sched2).step == 1


def test_unparseable_file_with_right_size(tmp_path):
    model, opt, sched = _setup()
    p = save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    f = p / "trainer.pt"
    f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(p, checksums=False)


def test_keep_last_and_resave(tmp_path):
    model, opt, sched = _setup()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    save_checkpoint(tmp_path, 5, model=model, keep_last=2, extra="again")  # re-save a step after a resume
    assert load_latest(tmp_path).extra == "again"
    assert load_latest(tmp_path / "empty") is None
    manifest = json.loads((tmp_path / "step_00000005" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "trainer.pt", "config.json"}


def test_all_corrupt_raises(tmp_path):
    model, _, _ = _setup()
    p = save_checkpoint(tmp_path, 1, model=model)
    (p / "manifest.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no loadable checkpoint"):
            load_latest(tmp_path)
